#ifndef STRATA_CHUGEPAGES_H
#define STRATA_CHUGEPAGES_H

// Buffers for long O_DIRECT transfers, carved out of 2 MiB slabs that are
// transparent huge pages where the kernel grants them, so each buffer is
// one physically contiguous segment. A block device takes a bounded number
// of segments per request (virtio-blk: 254), and on the benchmark VM the
// disk is much faster with few: fio 256 KiB O_DIRECT reads at QD64 (which
// the kernel merges into ~1 MiB requests) ran at 719-848 MiB/s from 4 KiB
// pages and 1720-1884 MiB/s from huge pages; a 1 MiB read from 4 KiB pages
// is even split in two.
//
// The functions match NIO's custom ByteBufferAllocator hooks. Every
// allocation is 4096-aligned, so O_DIRECT needs no padding (which would
// push a 2 MiB transfer past its slab). Short sizes come from per-size free
// lists (below); sizes that want neither, or arrive when every slab or
// short buffer is taken, come from posix_memalign, so an allocation never
// fails for want of slabs. Thread-safe: NIO may free a
// buffer on whichever thread drops it last.

#include <stddef.h>

/// Size of one slab (a transparent huge page on x86-64 and arm64 with 4K pages).
#define STRATA_HUGE_SLAB_SIZE ((size_t)2 << 20)
/// Allocations from this size to a whole slab get a chunk of a slab (a
/// power of two); shorter ones would waste most of it and gain little.
#define STRATA_HUGE_MIN_SIZE ((size_t)64 << 10)
/// Alignment of every allocation.
#define STRATA_HUGE_ALIGNMENT ((size_t)4096)

void *_Nullable strata_huge_alloc(size_t size);
void *_Nullable strata_huge_realloc(void *_Nullable ptr, size_t old_size, size_t new_size);
void strata_huge_free(void *_Nonnull ptr);
void strata_huge_copy(void *_Nonnull dst, const void *_Nonnull src, size_t count);

/// Whether `ptr` is a slab (for tests).
int strata_huge_is_slab(const void *_Nullable ptr);

// Short transfers (short_buffers.c): buffers up to this size are recycled
// per power-of-two size class (4 KiB up), so a request does not pay malloc.
#define STRATA_SHORT_MAX_SIZE ((size_t)32 << 10)

/// A recycled, page-aligned buffer of at least `size` bytes; NULL when
/// `size` is too long or its class has no room left (then use malloc).
void *_Nullable strata_short_take(size_t size);
/// Takes `ptr` back if it came from strata_short_take: 1, else 0.
int strata_short_give(void *_Nonnull ptr);
/// The usable size of a short buffer, or 0 if `ptr` is not one.
size_t strata_short_room(const void *_Nullable ptr);

#endif
