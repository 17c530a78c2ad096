/*
 * cacheline_pingpong.c - how long one cache line takes to move between
 * CPU 0 and CPU 1 (two threads take turns writing one line; half a round
 * trip is one transfer).  On a shared VM this moves with where the host
 * puts the two vCPUs; BENCHMARKS.md uses it to tell the machine's states
 * apart.
 *
 *     cc -O2 -pthread tools/cacheline_pingpong.c -o /tmp/pingpong && /tmp/pingpong
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <time.h>

#define ROUNDS 1000000u

static volatile uint64_t turn __attribute__((aligned(64)));

static int pin(int cpu)
{
    cpu_set_t s;
    CPU_ZERO(&s);
    CPU_SET(cpu, &s);
    return pthread_setaffinity_np(pthread_self(), sizeof(s), &s);
}

static void *answer(void *arg)
{
    (void)arg;
    pin(0);
    for (uint64_t i = 1; i < 2 * ROUNDS; i += 2) {
        while (turn != i)
            ;
        turn = i + 1;
    }
    return NULL;
}

int main(void)
{
    pthread_t t;
    struct timespec a, b;
    if (pthread_create(&t, NULL, answer, NULL) != 0 || pin(1) != 0) {
        fprintf(stderr, "cacheline_pingpong: error: needs CPUs 0 and 1\n");
        return 1;
    }
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (uint64_t i = 0; i < 2 * ROUNDS; i += 2) {
        turn = i + 1;
        while (turn != i + 2)
            ;
    }
    clock_gettime(CLOCK_MONOTONIC, &b);
    pthread_join(t, NULL);
    double ns = (double)(b.tv_sec - a.tv_sec) * 1e9 + (double)(b.tv_nsec - a.tv_nsec);
    printf("%.1f ns per cache-line transfer between CPU 0 and CPU 1\n", ns / (2.0 * ROUNDS));
    return 0;
}
