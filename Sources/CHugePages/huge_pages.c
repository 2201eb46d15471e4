#define _GNU_SOURCE
#include "CHugePages.h"

#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

// One address range, reserved on first use, holds every slab, so a free
// knows a slab by its address and no header is needed (NIO rounds buffer
// capacities to powers of two: a header would push 2 MiB past a slab).
// The range is MAP_NORESERVE: only slabs actually used take memory.
enum { slab_count = 32, resident_free_slabs = 16 };

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static char *region;          // slab_count slabs, 2 MiB aligned; NULL until used
static int region_failed;
static int free_stack[slab_count];
static int free_top;          // entries in free_stack
static int never_used;        // slabs [never_used, slab_count) were never handed out

static int reserve_region(void) {
    size_t length = slab_count * STRATA_HUGE_SLAB_SIZE;
    size_t mapped = length + STRATA_HUGE_SLAB_SIZE;
    char *raw = mmap(NULL, mapped, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (raw == MAP_FAILED) return -1;
    uintptr_t start = ((uintptr_t)raw + STRATA_HUGE_SLAB_SIZE - 1) & ~(uintptr_t)(STRATA_HUGE_SLAB_SIZE - 1);
    size_t head = start - (uintptr_t)raw;
    if (head > 0) munmap(raw, head);
    size_t tail = mapped - head - length;
    if (tail > 0) munmap((char *)start + length, tail);
    region = (char *)start;
    // Advice only: without transparent huge pages the slabs are ordinary
    // pages and everything still works.
    madvise(region, length, MADV_HUGEPAGE);
    return 0;
}

static int slab_index(const void *ptr) {
    if (region == NULL) return -1;
    uintptr_t p = (uintptr_t)ptr, base = (uintptr_t)region;
    if (p < base || p >= base + slab_count * STRATA_HUGE_SLAB_SIZE) return -1;
    return (int)((p - base) / STRATA_HUGE_SLAB_SIZE);
}

static int wants_slab(size_t size) {
    return size >= STRATA_HUGE_MIN_SIZE && size <= STRATA_HUGE_SLAB_SIZE;
}

static void *aligned_malloc(size_t size) {
    void *memory = NULL;
    if (posix_memalign(&memory, STRATA_HUGE_ALIGNMENT, size == 0 ? 1 : size) != 0) return NULL;
    return memory;
}

void *strata_huge_alloc(size_t size) {
    // Only transfers a scattered buffer could not carry in one request
    // want a slab; shorter ones would waste most of it.
    if (wants_slab(size)) {
        pthread_mutex_lock(&lock);
        if (region == NULL && !region_failed && reserve_region() != 0) region_failed = 1;
        int index = -1;
        if (region != NULL) {
            if (free_top > 0) index = free_stack[--free_top];
            else if (never_used < slab_count) index = never_used++;
        }
        pthread_mutex_unlock(&lock);
        if (index >= 0) return region + (size_t)index * STRATA_HUGE_SLAB_SIZE;
    }
    return aligned_malloc(size);
}

void strata_huge_free(void *ptr) {
    pthread_mutex_lock(&lock);
    int index = slab_index(ptr);
    int release = index >= 0 && free_top >= resident_free_slabs;
    if (index >= 0 && !release) free_stack[free_top++] = index;
    pthread_mutex_unlock(&lock);
    if (index < 0) {
        free(ptr);
    } else if (release) {
        // Past a few idle slabs, give the memory back. The slab stays
        // reserved and goes to the bottom of the stack, so the resident
        // ones are handed out first and a later burst faults it in again.
        madvise(region + (size_t)index * STRATA_HUGE_SLAB_SIZE, STRATA_HUGE_SLAB_SIZE, MADV_DONTNEED);
        pthread_mutex_lock(&lock);
        memmove(free_stack + 1, free_stack, (size_t)free_top * sizeof free_stack[0]);
        free_stack[0] = index;
        free_top++;
        pthread_mutex_unlock(&lock);
    }
}

void *strata_huge_realloc(void *ptr, size_t old_size, size_t new_size) {
    if (ptr == NULL) return strata_huge_alloc(new_size);
    int index;
    pthread_mutex_lock(&lock);
    index = slab_index(ptr);
    pthread_mutex_unlock(&lock);
    if (index >= 0 && new_size <= STRATA_HUGE_SLAB_SIZE) return ptr;
    void *fresh = strata_huge_alloc(new_size);
    if (fresh == NULL) return NULL;
    memcpy(fresh, ptr, old_size < new_size ? old_size : new_size);
    strata_huge_free(ptr);
    return fresh;
}

void strata_huge_copy(void *dst, const void *src, size_t count) {
    memcpy(dst, src, count);
}

int strata_huge_is_slab(const void *ptr) {
    pthread_mutex_lock(&lock);
    int index = slab_index(ptr);
    pthread_mutex_unlock(&lock);
    return index >= 0;
}
