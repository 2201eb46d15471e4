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
//
// A slab in use serves one size class, a power of two from
// STRATA_HUGE_MIN_SIZE to a whole slab, cut into equal chunks; a bitmap per
// slab says which chunks are free. A slab whose chunks are all free again
// goes back to the free stack, for any class.
enum {
    slab_count = 64,
    resident_free_slabs = 16,
    min_shift = 16,                              // log2 of STRATA_HUGE_MIN_SIZE
    slab_shift = 21,                             // log2 of STRATA_HUGE_SLAB_SIZE
    max_chunks = 1 << (slab_shift - min_shift),  // 32: one bit each in free_chunks
};
_Static_assert(max_chunks <= 32, "a slab's chunks must fit its bitmap");

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static char *region;          // slab_count slabs, 2 MiB aligned; NULL until used
static int region_failed;
// Free slabs: the resident_free on top still hold their memory; released
// ones (given back to the kernel) wait below them.
static int free_stack[slab_count];
static int free_top;          // entries in free_stack
static int resident_free;     // the top entries of free_stack that are resident
static int never_used;        // slabs [never_used, slab_count) were never handed out
static unsigned char slab_class[slab_count];  // chunk shift of a slab in use, 0 when free
static uint32_t free_chunks[slab_count];      // bit i set: chunk i of the slab is free

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

/// The chunk shift for `size`, or 0 if it does not want a slab.
static int size_shift(size_t size) {
    if (size < STRATA_HUGE_MIN_SIZE || size > STRATA_HUGE_SLAB_SIZE) return 0;
    int shift = min_shift;
    while (((size_t)1 << shift) < size) shift++;
    return shift;
}

static void *aligned_malloc(size_t size) {
    void *memory = NULL;
    if (posix_memalign(&memory, STRATA_HUGE_ALIGNMENT, size == 0 ? 1 : size) != 0) return NULL;
    return memory;
}

/// The bitmap of a slab of class `shift` with every chunk free.
static uint32_t all_chunks(int shift) {
    int chunks = 1 << (slab_shift - shift);
    return chunks == 32 ? UINT32_MAX : ((uint32_t)1 << chunks) - 1;  // no 1 << 32
}

/// A chunk of class `shift`, or NULL when every slab is taken. Holds `lock`.
static void *take_chunk(int shift) {
    int slab = -1;
    for (int index = 0; index < never_used; index++) {
        if (slab_class[index] == shift && free_chunks[index] != 0) {
            slab = index;
            break;
        }
    }
    if (slab < 0) {
        if (free_top > 0) {
            slab = free_stack[--free_top];
            if (resident_free > 0) resident_free--;
        } else if (never_used < slab_count) {
            slab = never_used++;
        } else {
            return NULL;
        }
        slab_class[slab] = (unsigned char)shift;
        free_chunks[slab] = all_chunks(shift);
    }
    int chunk = __builtin_ctz(free_chunks[slab]);
    free_chunks[slab] &= ~((uint32_t)1 << chunk);
    return region + (size_t)slab * STRATA_HUGE_SLAB_SIZE + ((size_t)chunk << shift);
}

void *strata_huge_alloc(size_t size) {
    void *recycled = strata_short_take(size);
    if (recycled != NULL) return recycled;
    // Short allocations would waste most of a chunk and gain nothing.
    int shift = size_shift(size);
    if (shift != 0) {
        pthread_mutex_lock(&lock);
        if (region == NULL && !region_failed && reserve_region() != 0) region_failed = 1;
        void *chunk = region != NULL ? take_chunk(shift) : NULL;
        pthread_mutex_unlock(&lock);
        if (chunk != NULL) return chunk;
    }
    return aligned_malloc(size);
}

void strata_huge_free(void *ptr) {
    if (strata_short_give(ptr)) return;
    pthread_mutex_lock(&lock);
    int index = slab_index(ptr);
    if (index < 0) {
        pthread_mutex_unlock(&lock);
        free(ptr);
        return;
    }
    int shift = slab_class[index];
    if (shift == 0) abort();  // a free slab: a double free, a programmer error
    size_t offset = (size_t)((char *)ptr - region) - (size_t)index * STRATA_HUGE_SLAB_SIZE;
    free_chunks[index] |= (uint32_t)1 << (offset >> shift);
    if (free_chunks[index] != all_chunks(shift)) {
        pthread_mutex_unlock(&lock);
        return;
    }
    slab_class[index] = 0;
    // Counted apart from released slabs: counting those too would release
    // every slab freed after a burst, and each would fault in again.
    int release = resident_free >= resident_free_slabs;
    if (!release) {
        free_stack[free_top++] = index;
        resident_free++;
    }
    pthread_mutex_unlock(&lock);
    if (release) {
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
    pthread_mutex_lock(&lock);
    int index = slab_index(ptr);
    size_t room = index >= 0 ? (size_t)1 << slab_class[index] : 0;
    pthread_mutex_unlock(&lock);
    if (room == 0) room = strata_short_room(ptr);
    if (new_size <= room) return ptr;
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
