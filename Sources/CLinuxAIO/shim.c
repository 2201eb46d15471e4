#define _GNU_SOURCE
#include "CLinuxAIO.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <linux/stat.h>
#include <spawn.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

const int strata_O_DIRECT = O_DIRECT;
const int strata_O_DSYNC = O_DSYNC;
const int strata_RWF_DSYNC = RWF_DSYNC;
const int strata_RWF_NOWAIT = RWF_NOWAIT;

void strata_iocb_prep(struct iocb *iocb, int fd, int is_write, void *buf,
                      size_t count, int64_t offset, int eventfd,
                      int rw_flags, uint64_t tag) {
    if (is_write) {
        io_prep_pwrite(iocb, fd, buf, count, offset);
    } else {
        io_prep_pread(iocb, fd, buf, count, offset);
    }
    iocb->aio_rw_flags = rw_flags;
    io_set_eventfd(iocb, eventfd);
    iocb->data = (void *)(uintptr_t)tag;
}

void strata_iocb_prep_fdsync(struct iocb *iocb, int fd, int eventfd, uint64_t tag) {
    io_prep_fdsync(iocb, fd);
    io_set_eventfd(iocb, eventfd);
    iocb->data = (void *)(uintptr_t)tag;
}

uint64_t strata_io_event_tag(const struct io_event *event) {
    return (uint64_t)(uintptr_t)event->data;
}

int64_t strata_io_event_result(const struct io_event *event) {
    return (int64_t)(long)event->res;
}

int strata_io_getevents_nowait(io_context_t ctx, long max, struct io_event *events) {
    struct timespec zero = {0, 0};
    return io_getevents(ctx, 0, max, events, &zero);
}

/* The header of the ring io_setup maps (the context id is its address),
   as the kernel lays it out; io_events follow it. The kernel advances
   `tail` as requests finish; whoever takes events advances `head`, which
   the kernel reads back when it looks for free room. */
struct strata_aio_ring {
    unsigned id, nr, head, tail, magic, compat_features, incompat_features, header_length;
};
#define STRATA_AIO_RING_MAGIC 0xa10a10a1u

int strata_aio_ring_known(io_context_t ctx) {
    const struct strata_aio_ring *ring = (const struct strata_aio_ring *)ctx;
    return ring->magic == STRATA_AIO_RING_MAGIC && ring->incompat_features == 0 &&
           ring->header_length == sizeof(*ring);
}

int strata_aio_ring_may_have_events(io_context_t ctx) {
    const struct strata_aio_ring *ring = (const struct strata_aio_ring *)ctx;
    if (!strata_aio_ring_known(ctx)) {
        return 1;
    }
    return ring->head != __atomic_load_n(&ring->tail, __ATOMIC_ACQUIRE);
}

int strata_aio_reap(io_context_t ctx, long max, struct io_event *events) {
    struct strata_aio_ring *ring = (struct strata_aio_ring *)ctx;
    if (!strata_aio_ring_known(ctx)) {
        return strata_io_getevents_nowait(ctx, max, events);
    }
    unsigned nr = ring->nr;
    unsigned head = ring->head;
    /* Acquire: the events up to `tail` are written before it moves. */
    unsigned tail = __atomic_load_n(&ring->tail, __ATOMIC_ACQUIRE);
    if (head >= nr || tail >= nr) {
        return strata_io_getevents_nowait(ctx, max, events);
    }
    const struct io_event *ring_events = (const struct io_event *)(ring + 1);
    long count = 0;
    while (head != tail && count < max) {
        events[count++] = ring_events[head];
        head = head + 1 == nr ? 0 : head + 1;
    }
    /* Release: the kernel may reuse the slots only after they are copied. */
    __atomic_store_n(&ring->head, head, __ATOMIC_RELEASE);
    return (int)count;
}

int strata_eventfd(void) {
    return eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
}

int strata_dio_alignment(int fd, uint32_t *mem_align, uint32_t *offset_align) {
#ifdef STATX_DIOALIGN
    struct statx stx;
    memset(&stx, 0, sizeof(stx));
    if (syscall(SYS_statx, fd, "", AT_EMPTY_PATH, STATX_DIOALIGN, &stx) != 0) {
        return -1;
    }
    if (!(stx.stx_mask & STATX_DIOALIGN) || stx.stx_dio_offset_align == 0) {
        return -1;
    }
    *mem_align = stx.stx_dio_mem_align;
    *offset_align = stx.stx_dio_offset_align;
    return 0;
#else
    (void)fd; (void)mem_align; (void)offset_align;
    return -1;
#endif
}

int strata_is_block_device(int fd) {
    struct statx stx;
    if (syscall(SYS_statx, fd, "", AT_EMPTY_PATH, STATX_TYPE, &stx) != 0) {
        return -errno;
    }
    return ((stx.stx_mode & 0170000) == 0060000) ? 1 : 0;
}

int64_t strata_fd_size(int fd) {
    int blk = strata_is_block_device(fd);
    if (blk < 0) return blk;
    if (blk) {
        uint64_t size = 0;
        if (ioctl(fd, BLKGETSIZE64, &size) != 0) return -errno;
        return (int64_t)size;
    }
    struct statx stx;
    if (syscall(SYS_statx, fd, "", AT_EMPTY_PATH, STATX_SIZE, &stx) != 0) {
        return -errno;
    }
    return (int64_t)stx.stx_size;
}

int64_t strata_fd_allocated_bytes(int fd) {
    struct statx stx;
    if (syscall(SYS_statx, fd, "", AT_EMPTY_PATH, STATX_BLOCKS, &stx) != 0) {
        return -errno;
    }
    return (int64_t)stx.stx_blocks * 512;
}

int strata_block_sector_size(int fd) {
    int size = 0;
    if (ioctl(fd, BLKSSZGET, &size) != 0) return 0;
    return size;
}

int strata_zero_range(int fd, int64_t offset, int64_t length) {
    return fallocate(fd, FALLOC_FL_ZERO_RANGE, offset, length) == 0 ? 0 : -errno;
}

int strata_punch_hole(int fd, int64_t offset, int64_t length) {
    return fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) == 0 ? 0 : -errno;
}

int64_t strata_seek_data(int fd, int64_t offset) {
    off_t r = lseek(fd, offset, SEEK_DATA);
    return r < 0 ? -errno : (int64_t)r;
}

int64_t strata_seek_hole(int fd, int64_t offset) {
    off_t r = lseek(fd, offset, SEEK_HOLE);
    return r < 0 ? -errno : (int64_t)r;
}

ssize_t strata_pread(int fd, void *buf, size_t count, int64_t offset, int flags) {
    struct iovec iov = { buf, count };
    ssize_t r = preadv2(fd, &iov, 1, offset, flags);
    return r < 0 ? -errno : r;
}

ssize_t strata_pwrite(int fd, const void *buf, size_t count, int64_t offset, int flags) {
    struct iovec iov = { (void *)buf, count };
    ssize_t r = pwritev2(fd, &iov, 1, offset, flags);
    return r < 0 ? -errno : r;
}

int strata_fdatasync(int fd) {
    return fdatasync(fd) == 0 ? 0 : -errno;
}

#ifndef __NR_cachestat
#define __NR_cachestat 451   /* the same number on every architecture */
#endif

int64_t strata_cached_pages(int fd, int64_t offset, int64_t length) {
    /* The kernel's struct cachestat_range and struct cachestat, spelled out
       so older headers build too. */
    struct { uint64_t off, len; } range = { (uint64_t)offset, (uint64_t)length };
    struct { uint64_t nr_cache, nr_dirty, nr_writeback, nr_evicted, nr_recently_evicted; } stat;
    long r = syscall(__NR_cachestat, fd, &range, &stat, 0);
    return r < 0 ? -errno : (int64_t)stat.nr_cache;
}

int strata_ofd_lock(int fd, int64_t offset, int exclusive, int unlock) {
    struct flock fl;
    memset(&fl, 0, sizeof(fl));
    fl.l_whence = SEEK_SET;
    fl.l_start = offset;
    fl.l_len = 1;
    fl.l_type = unlock ? F_UNLCK : (exclusive ? F_WRLCK : F_RDLCK);
    return fcntl(fd, F_OFD_SETLK, &fl) == 0 ? 0 : -errno;
}

int strata_ofd_lock_conflicts(int fd, int64_t offset) {
    struct flock fl;
    memset(&fl, 0, sizeof(fl));
    fl.l_whence = SEEK_SET;
    fl.l_start = offset;
    fl.l_len = 1;
    fl.l_type = F_WRLCK;
    if (fcntl(fd, F_OFD_GETLK, &fl) != 0) return -errno;
    return fl.l_type == F_UNLCK ? 0 : 1;
}

int strata_spawn_close_from(posix_spawn_file_actions_t *actions, int from) {
    return posix_spawn_file_actions_addclosefrom_np(actions, from);
}
