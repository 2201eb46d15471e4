// A minimal io_uring ring for the file driver's `aio=io_uring` mode, on the
// raw system calls (no liburing): setup and mmap, queueing read, write and
// fdatasync entries, submitting them in batches, and reaping completions.
// The ring belongs to one event loop; nothing here is thread-safe.
#define _GNU_SOURCE
#include "CLinuxAIO.h"

#include <errno.h>
#include <linux/io_uring.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

struct strata_uring {
    int fd;
    unsigned sq_entries, sq_mask, cq_mask;
    unsigned *sq_head, *sq_tail, *cq_head, *cq_tail;
    struct io_uring_sqe *sqes;
    struct io_uring_cqe *cqes;
    void *ring_map, *cq_map;
    size_t ring_size, cq_size, sqes_size;
    unsigned local_tail;   // entries queued by us; published on submit
};

static void unmap_all(struct strata_uring *ring) {
    if (ring->sqes) munmap(ring->sqes, ring->sqes_size);
    if (ring->cq_map && ring->cq_map != ring->ring_map) munmap(ring->cq_map, ring->cq_size);
    if (ring->ring_map) munmap(ring->ring_map, ring->ring_size);
}

struct strata_uring *strata_uring_create(unsigned entries, int eventfd, int *error) {
    struct io_uring_params params;
    int fd = -1;
    // COOP_TASKRUN (5.19+): completions do not interrupt the loop with an
    // IPI while it runs; a sleeping loop is still woken. Older kernels: plain.
    unsigned flag_sets[] = {IORING_SETUP_CLAMP | IORING_SETUP_COOP_TASKRUN, IORING_SETUP_CLAMP};
    for (unsigned i = 0; i < 2 && fd < 0; i++) {
        memset(&params, 0, sizeof(params));
        params.flags = flag_sets[i];
        fd = (int)syscall(__NR_io_uring_setup, entries, &params);
        if (fd < 0 && errno != EINVAL) break;
    }
    if (fd < 0) { *error = errno; return NULL; }
    // Linux 5.12+ (native io workers): older rings lack operations or
    // complete buffered I/O on kernel threads only; treat them as absent.
    if (!(params.features & IORING_FEAT_NATIVE_WORKERS)) { close(fd); *error = ENOSYS; return NULL; }
    struct strata_uring *ring = calloc(1, sizeof(*ring));
    if (!ring) { close(fd); *error = ENOMEM; return NULL; }
    ring->fd = fd;
    ring->ring_size = params.sq_off.array + params.sq_entries * sizeof(unsigned);
    ring->cq_size = params.cq_off.cqes + params.cq_entries * sizeof(struct io_uring_cqe);
    int single = (params.features & IORING_FEAT_SINGLE_MMAP) != 0;
    if (single && ring->cq_size > ring->ring_size) ring->ring_size = ring->cq_size;
    ring->ring_map = mmap(NULL, ring->ring_size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE,
                          fd, IORING_OFF_SQ_RING);
    if (ring->ring_map == MAP_FAILED) { ring->ring_map = NULL; goto fail; }
    if (single) {
        ring->cq_map = ring->ring_map;
    } else {
        ring->cq_map = mmap(NULL, ring->cq_size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE,
                            fd, IORING_OFF_CQ_RING);
        if (ring->cq_map == MAP_FAILED) { ring->cq_map = NULL; goto fail; }
    }
    ring->sqes_size = params.sq_entries * sizeof(struct io_uring_sqe);
    ring->sqes = mmap(NULL, ring->sqes_size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE,
                      fd, IORING_OFF_SQES);
    if (ring->sqes == MAP_FAILED) { ring->sqes = NULL; goto fail; }

    char *sq = ring->ring_map, *cq = ring->cq_map;
    ring->sq_entries = params.sq_entries;
    ring->sq_head = (unsigned *)(sq + params.sq_off.head);
    ring->sq_tail = (unsigned *)(sq + params.sq_off.tail);
    ring->sq_mask = *(unsigned *)(sq + params.sq_off.ring_mask);
    unsigned *array = (unsigned *)(sq + params.sq_off.array);
    for (unsigned i = 0; i < params.sq_entries; i++) array[i] = i;   // slot i is SQE i, always
    ring->cq_head = (unsigned *)(cq + params.cq_off.head);
    ring->cq_tail = (unsigned *)(cq + params.cq_off.tail);
    ring->cq_mask = *(unsigned *)(cq + params.cq_off.ring_mask);
    ring->cqes = (struct io_uring_cqe *)(cq + params.cq_off.cqes);
    ring->local_tail = *ring->sq_tail;

    // Every completion signals the eventfd. (IORING_REGISTER_EVENTFD_ASYNC
    // would skip the ones the kernel posts from task work on this thread,
    // which is how O_DIRECT and page-cache-miss reads complete.)
    if (syscall(__NR_io_uring_register, fd, IORING_REGISTER_EVENTFD, &eventfd, 1) < 0) goto fail;
    return ring;

fail:
    *error = errno ? errno : ENOMEM;
    int saved = *error;
    unmap_all(ring);
    close(fd);
    free(ring);
    *error = saved;
    return NULL;
}

void strata_uring_destroy(struct strata_uring *ring) {
    if (!ring) return;
    unmap_all(ring);
    close(ring->fd);
    free(ring);
}

unsigned strata_uring_entries(const struct strata_uring *ring) { return ring->sq_entries; }

static struct io_uring_sqe *next_sqe(struct strata_uring *ring) {
    unsigned head = __atomic_load_n(ring->sq_head, __ATOMIC_ACQUIRE);
    if (ring->local_tail - head >= ring->sq_entries) return NULL;
    struct io_uring_sqe *sqe = &ring->sqes[ring->local_tail & ring->sq_mask];
    memset(sqe, 0, sizeof(*sqe));
    ring->local_tail++;
    return sqe;
}

int strata_uring_prep_rw(struct strata_uring *ring, int is_write, int fd, void *buf, uint32_t count,
                         int64_t offset, int rw_flags, uint64_t tag) {
    struct io_uring_sqe *sqe = next_sqe(ring);
    if (!sqe) return -EBUSY;
    sqe->opcode = is_write ? IORING_OP_WRITE : IORING_OP_READ;
    sqe->fd = fd;
    sqe->addr = (uint64_t)(uintptr_t)buf;
    sqe->len = count;
    sqe->off = (uint64_t)offset;
    sqe->rw_flags = rw_flags;
    sqe->user_data = tag;
    return 0;
}

int strata_uring_prep_fdatasync(struct strata_uring *ring, int fd, uint64_t tag) {
    struct io_uring_sqe *sqe = next_sqe(ring);
    if (!sqe) return -EBUSY;
    sqe->opcode = IORING_OP_FSYNC;
    sqe->fd = fd;
    sqe->fsync_flags = IORING_FSYNC_DATASYNC;
    sqe->user_data = tag;
    return 0;
}

unsigned strata_uring_unsubmitted(const struct strata_uring *ring) {
    return ring->local_tail - __atomic_load_n(ring->sq_head, __ATOMIC_ACQUIRE);
}

int strata_uring_submit(struct strata_uring *ring, unsigned max) {
    __atomic_store_n(ring->sq_tail, ring->local_tail, __ATOMIC_RELEASE);
    unsigned waiting = strata_uring_unsubmitted(ring);
    if (waiting == 0) return 0;
    unsigned count = waiting < max ? waiting : max;
    int result = (int)syscall(__NR_io_uring_enter, ring->fd, count, 0, 0, NULL, 0);
    return result < 0 ? -errno : result;
}

unsigned strata_uring_unqueue(struct strata_uring *ring, uint64_t *tags, unsigned max) {
    unsigned head = __atomic_load_n(ring->sq_head, __ATOMIC_ACQUIRE);
    unsigned count = 0;
    for (unsigned index = head; index != ring->local_tail && count < max; index++) {
        tags[count++] = ring->sqes[index & ring->sq_mask].user_data;
    }
    // Safe without SQPOLL: the kernel reads the tail only inside io_uring_enter.
    ring->local_tail = head;
    __atomic_store_n(ring->sq_tail, ring->local_tail, __ATOMIC_RELEASE);
    return count;
}

unsigned strata_uring_reap(struct strata_uring *ring, uint64_t *tags, int32_t *results, unsigned max) {
    unsigned head = *ring->cq_head;
    unsigned tail = __atomic_load_n(ring->cq_tail, __ATOMIC_ACQUIRE);
    unsigned count = 0;
    while (head != tail && count < max) {
        const struct io_uring_cqe *cqe = &ring->cqes[head & ring->cq_mask];
        tags[count] = cqe->user_data;
        results[count] = cqe->res;
        count++;
        head++;
    }
    __atomic_store_n(ring->cq_head, head, __ATOMIC_RELEASE);
    return count;
}
