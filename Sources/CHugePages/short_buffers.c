#define _GNU_SOURCE
#include "CHugePages.h"

#include <pthread.h>
#include <stdint.h>
#include <sys/mman.h>

// Short transfer buffers (4 to 32 KiB) are recycled per size class instead
// of going back to malloc: NIO asks for a fresh buffer for every 4 KiB read
// (8 KiB with the reply header's page), and glibc served that size from
// its bins for about 2,500 instructions per request, a fifth of the whole
// request (callgrind). A free buffer is pushed on its class's free list,
// linked through its first word, and the next request of that class pops
// it: a lock and a few stores.
//
// Each class carves its buffers out of its own part of one reserved
// address range (MAP_NORESERVE: only buffers actually used take memory), so
// a free knows a buffer's class by its address. A class whose part is used
// up hands out NULL and the caller falls back to posix_memalign. Memory a
// class has used stays with it: at most short_part bytes per class.
enum {
    short_min_shift = 12,  // 4 KiB
    short_max_shift = 15,  // 32 KiB
    short_classes = short_max_shift - short_min_shift + 1,
};
static const size_t short_part = (size_t)8 << 20;

static pthread_mutex_t short_lock = PTHREAD_MUTEX_INITIALIZER;
static char *short_region;         // short_classes parts; NULL until first used
static int short_region_failed;
static size_t short_carved[short_classes];  // bytes of each part handed out at least once
static void *short_free[short_classes];     // free lists, linked through the first word

static int short_reserve(void) {
    void *raw = mmap(NULL, short_classes * short_part, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (raw == MAP_FAILED) return -1;
    short_region = raw;  // page-aligned, and every buffer size is a multiple of a page
    return 0;
}

/// The class of `ptr`, or -1 if it is not a short buffer.
static int short_class_of(const void *ptr) {
    uintptr_t p = (uintptr_t)ptr, base = (uintptr_t)short_region;
    if (short_region == NULL || p < base || p >= base + short_classes * short_part) return -1;
    return (int)((p - base) / short_part);
}

void *strata_short_take(size_t size) {
    if (size > STRATA_SHORT_MAX_SIZE) return NULL;
    int shift = short_min_shift;
    while (((size_t)1 << shift) < size) shift++;
    int class = shift - short_min_shift;
    void *buffer = NULL;
    pthread_mutex_lock(&short_lock);
    if (short_region == NULL && !short_region_failed && short_reserve() != 0) short_region_failed = 1;
    if (short_region != NULL) {
        if (short_free[class] != NULL) {
            buffer = short_free[class];
            short_free[class] = *(void **)buffer;
        } else if (short_carved[class] + ((size_t)1 << shift) <= short_part) {
            buffer = short_region + (size_t)class * short_part + short_carved[class];
            short_carved[class] += (size_t)1 << shift;
        }
    }
    pthread_mutex_unlock(&short_lock);
    return buffer;
}

int strata_short_give(void *ptr) {
    pthread_mutex_lock(&short_lock);
    int class = short_class_of(ptr);
    if (class >= 0) {
        *(void **)ptr = short_free[class];
        short_free[class] = ptr;
    }
    pthread_mutex_unlock(&short_lock);
    return class >= 0;
}

size_t strata_short_room(const void *ptr) {
    pthread_mutex_lock(&short_lock);
    int class = short_class_of(ptr);
    pthread_mutex_unlock(&short_lock);
    return class >= 0 ? (size_t)1 << (class + short_min_shift) : 0;
}
