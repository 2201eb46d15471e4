#ifndef STRATA_CLINUXAIO_H
#define STRATA_CLINUXAIO_H

// A thin shim over the Linux calls Strata's file driver needs: libaio,
// eventfd, statx DIOALIGN, fallocate, block-device ioctls, OFD locks and
// preadv2/pwritev2 flags. Constants that need _GNU_SOURCE are exported as
// values so Swift never has to define it.

#include <stdint.h>
#include <stddef.h>
#include <sys/types.h>
#include <libaio.h>
#include <spawn.h>

extern const int strata_O_DIRECT;
extern const int strata_O_DSYNC;

// --- Linux AIO ---------------------------------------------------------

/// Prepares `iocb` for a read (`is_write` = 0) or write (1) and ties its
/// completion to `eventfd`. `rw_flags` are RWF_* flags (RWF_DSYNC for FUA).
void strata_iocb_prep(struct iocb *iocb, int fd, int is_write, void *buf,
                      size_t count, int64_t offset, int eventfd,
                      int rw_flags, uint64_t tag);
/// Prepares `iocb` for an fdatasync.
void strata_iocb_prep_fdsync(struct iocb *iocb, int fd, int eventfd, uint64_t tag);
uint64_t strata_io_event_tag(const struct io_event *event);
/// The result of an event: bytes transferred, or a negative errno.
int64_t strata_io_event_result(const struct io_event *event);
/// io_getevents with a zero timeout: never blocks.
int strata_io_getevents_nowait(io_context_t ctx, long max, struct io_event *events);
/// Takes up to `max` finished events without a system call, from the
/// completion ring the kernel maps into the process for `ctx` (its header
/// is kernel ABI, fs/aio.c); falls back to strata_io_getevents_nowait when
/// the ring does not look like one this code knows. Never blocks.
int strata_aio_reap(io_context_t ctx, long max, struct io_event *events);
/// 1 if strata_aio_reap reads `ctx`'s ring itself, 0 if it falls back.
int strata_aio_ring_known(io_context_t ctx);
/// 0 if `ctx`'s ring holds no finished event now, 1 if it does or the
/// ring is not one this code knows (then only a system call could tell).
int strata_aio_ring_may_have_events(io_context_t ctx);

extern const int strata_RWF_DSYNC;
extern const int strata_RWF_NOWAIT;

// --- io_uring (uring.c) ------------------------------------------------
/// One io_uring for one event loop, on the raw system calls.
typedef struct strata_uring strata_uring;
/// Sets up a ring of at least `entries` submissions whose out-of-line
/// completions signal `eventfd`; NULL with `*error` set on failure.
strata_uring *strata_uring_create(unsigned entries, int eventfd, int *error);
void strata_uring_destroy(strata_uring *ring);
/// Submission entries the ring has (entries rounded to a power of two).
unsigned strata_uring_entries(const strata_uring *ring);
/// Queues a read (`is_write` 0) or write (1); -EBUSY when the ring is full.
int strata_uring_prep_rw(strata_uring *ring, int is_write, int fd, void *buf, uint32_t count,
                         int64_t offset, int rw_flags, uint64_t tag);
/// Queues an fdatasync; -EBUSY when the ring is full.
int strata_uring_prep_fdatasync(strata_uring *ring, int fd, uint64_t tag);
/// Queued entries the kernel has not taken yet.
unsigned strata_uring_unsubmitted(const strata_uring *ring);
/// Passes at most `max` queued entries to the kernel (one io_uring_enter);
/// the number taken, or -errno.
int strata_uring_submit(strata_uring *ring, unsigned max);
/// Takes back every entry the kernel has not taken (after a failed submit),
/// copying up to `max` tags out (pass room for strata_uring_entries); returns
/// how many were copied.
unsigned strata_uring_unqueue(strata_uring *ring, uint64_t *tags, unsigned max);
/// Copies up to `max` completions out: each entry's tag and result (bytes
/// or -errno). Returns how many.
unsigned strata_uring_reap(strata_uring *ring, uint64_t *tags, int32_t *results, unsigned max);

// --- eventfd -------------------------------------------------------------
int strata_eventfd(void);

// --- statx DIOALIGN --------------------------------------------------------
/// Fills the O_DIRECT memory and offset alignment of `fd`; returns 0 when the
/// kernel reported them, -1 otherwise (older kernel or filesystem).
int strata_dio_alignment(int fd, uint32_t *mem_align, uint32_t *offset_align);

// --- sizes and devices -----------------------------------------------------
/// 1 if `fd` is a block device, 0 if a regular file, -errno on error.
int strata_is_block_device(int fd);
/// Size in bytes of a block device or regular file; -errno on error.
int64_t strata_fd_size(int fd);
/// Bytes allocated to `fd` on disk (st_blocks * 512), or -errno.
int64_t strata_fd_allocated_bytes(int fd);
/// Logical sector size of a block device, or 0.
int strata_block_sector_size(int fd);

// --- fallocate ------------------------------------------------------------
/// Zeroes a range keeping it allocated (FALLOC_FL_ZERO_RANGE); -errno.
int strata_zero_range(int fd, int64_t offset, int64_t length);
/// Punches a hole keeping the size (PUNCH_HOLE|KEEP_SIZE); -errno.
int strata_punch_hole(int fd, int64_t offset, int64_t length);

// --- seek data / hole --------------------------------------------------------
/// lseek(SEEK_DATA) / lseek(SEEK_HOLE); the offset or -errno.
int64_t strata_seek_data(int fd, int64_t offset);
int64_t strata_seek_hole(int fd, int64_t offset);

// --- positional I/O with flags ------------------------------------------------
/// preadv2/pwritev2 of one buffer; bytes or -errno.
ssize_t strata_pread(int fd, void *buf, size_t count, int64_t offset, int flags);
ssize_t strata_pwrite(int fd, const void *buf, size_t count, int64_t offset, int flags);
int strata_fdatasync(int fd);

// --- page cache residency -------------------------------------------------------
/// cachestat(2) (Linux 6.5): how many of the pages spanning
/// [offset, offset + length) are in the page cache; -errno on failure
/// (-ENOSYS on older kernels).
int64_t strata_cached_pages(int fd, int64_t offset, int64_t length);

// --- OFD locks ------------------------------------------------------------
/// Takes (`exclusive` 0: shared, 1: exclusive) or drops (`unlock` 1) a
/// one-byte OFD lock at `offset`; 0 or -errno.
int strata_ofd_lock(int fd, int64_t offset, int exclusive, int unlock);
/// 1 if another open file description holds a lock that conflicts with an
/// exclusive lock of the byte at `offset`, 0 if none, -errno on error.
int strata_ofd_lock_conflicts(int fd, int64_t offset);

// --- process spawning -----------------------------------------------------
/// posix_spawn_file_actions_addclosefrom_np (glibc 2.34): the child closes
/// every descriptor from `from` on. 0 or an errno.
int strata_spawn_close_from(posix_spawn_file_actions_t *actions, int from);

#endif
