/*
 * _fusell: the project's own binding of libfuse 3's low-level API.
 *
 * Only cvmfs_like/fs.py imports it.  The kernel is asked to do as much as it
 * can on its own (no OPEN/OPENDIR round trips, cached directory listings,
 * READDIRPLUS, 992 KiB reads, splice), and what still reaches this process is
 * answered here:
 *
 *   - READ of a file whose verified cached objects were handed over with
 *     Session.set_fds() is answered in C from those descriptors (spliced
 *     to the kernel), without the GIL and without a global lock: the table
 *     is sharded, and each shard has a reader-writer lock that only
 *     registration, FORGET and eviction take for writing; so is the first
 *     READ of a file whose verified cached objects Python named at LOOKUP
 *     (Session.set_paths): C opens each chunk's object when a read first
 *     needs it, and those of the chunks ahead of the reader (checking sizes
 *     if the cache owes that check), and installs the descriptors, or leaves
 *     the read to Python when an object is gone or cut;
 *   - READDIR of a directory listed before, and LOOKUP of a name in it
 *     (present or absent), are answered in C from the listing table: the
 *     listings Python gave, kept until a revision switch drops them all
 *     (Session.drop_listings), so a dropped page cache costs no Python call
 *     for what was listed once;
 *   - everything else (LOOKUP, GETATTR, READDIR, READLINK, a READ not in the
 *     table, FORGET, xattrs, statfs) calls one method of the Python
 *     operations object with the GIL held.  A method returns its answer, or an
 *     int: the errno to reply with.  Python exceptions never reach here as
 *     replies; an unexpected one is printed and answered with EIO.
 *
 * Invariants: a descriptor in the table is owned by the table (closed on
 * replacement, FORGET, eviction or session end) and is only closed under
 * its shard's write lock; a read duplicates the descriptors it needs under
 * the read lock and splices from the duplicates after releasing it, so a
 * registration never waits for a disk-bound splice.  A listing is freed only
 * under its shard's write lock, and one made from an answer Python gave
 * before a drop_listings is never kept (the generation check).  No thread
 * holding a shard lock waits for the GIL.
 */
#define PY_SSIZE_T_CLEAN
#define FUSE_USE_VERSION 314
#include <Python.h>
#include <errno.h>
#include <fcntl.h>
#include <fuse_lowlevel.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <limits.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define STREAM_BIT (1ULL << 62) /* inode numbers of files read without the page cache */
#define SHARDS 64
#define SHARD_SLOTS 1024        /* per shard: SHARDS * SHARD_SLOTS files' descriptors */
#define MAX_PIECES 16
#define READ_WHOLE (128 << 10) /* objects above it are advised WILLNEED when opened (as mounted.py) */
#define BACKGROUND 64          /* asynchronous READs the kernel may have in flight */
#define READ_MAX (248 * 4096)  /* largest READ: its splice fits a pipe of fs.pipe-max-size (1 MiB) */
#define AHEAD_BYTES (64ULL << 20) /* of a file C opens itself: opened ahead of its reader (as fs.py) */
#define AHEAD_MAX 64              /* chunks one read opens ahead (chunks are at least 1 MiB) */

typedef struct {
    uint64_t ino;     /* 0: free */
    int n;            /* chunks */
    int *fds;         /* n descriptors */
    uint64_t *offs;   /* n+1 offsets: chunk i is [offs[i], offs[i+1]) */
    char **paths;     /* NULL, or n: while fds[i] < 0, chunk i's verified object C may
                         open itself (NULL: not, or not again) */
    int check_size;   /* ... after checking that it is offs[i+1] - offs[i] bytes long */
    int ahead;        /* chunks below this were claimed by a read for opening ahead */
} FdEntry;

typedef struct {
    pthread_rwlock_t lock;
    FdEntry slots[SHARD_SLOTS];
    unsigned victim; /* clock hand of evictions */
    long fds;        /* descriptors held by this shard's entries */
} FdShard;

/* One directory's listing, as Python gave it: entries in listing order
 * (READDIR offsets index them) and an index sorted by name (LOOKUP). */
typedef struct {
    uint64_t ino, mode, nlink, size;
    int64_t mtime_ns;
    const char *name; /* into Listing.names */
} DirEnt;

typedef struct Listing {
    struct Listing *next; /* bucket chain */
    uint64_t ino;
    size_t n;
    long bytes; /* held, for MAX_LISTED */
    DirEnt *ents;
    uint32_t *byname;
    char *names;
} Listing;

#define LIST_SHARDS 64
#define LIST_BUCKETS 1024          /* per shard */
#define MAX_LISTED (64L << 20)    /* bytes held by all listings; beyond, all are dropped */

typedef struct {
    pthread_rwlock_t lock;
    Listing *buckets[LIST_BUCKETS];
} ListShard;

typedef struct {
    PyObject_HEAD
    struct fuse_session *se;
    PyObject *ops;
    double entry_timeout;
    double negative_timeout;
    int no_open;
    int mounted;
    int signals;
    FdShard *shards;
    long shard_fd_cap; /* descriptors a shard may hold (the process's limit, shared out) */
    pthread_mutex_t notify_lock; /* serialises notifications against session teardown */
    ListShard *lists;
    unsigned long long list_gen; /* bumped by every drop of all listings */
    long listed;                 /* bytes held by listings */
    /* counters, read by tests and the bench (relaxed, approximate under races) */
    unsigned long long n_open, n_opendir, n_read_c, n_read_py, n_lookup, n_readdir, n_getattr;
    unsigned long long n_lookup_c, n_readdir_c; /* of n_lookup, n_readdir: answered in C */
    unsigned long long n_open_c;                /* objects C opened itself (Session.set_paths) */
    /* microseconds spent answering in Python (GIL wait included), by kind */
    unsigned long long us_lookup, us_read_py, us_readdir, us_getattr;
} Session;

static inline unsigned long long now_us(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (unsigned long long)ts.tv_sec * 1000000ULL + (unsigned long long)ts.tv_nsec / 1000;
}

#define SPENT(s, field, t0) __atomic_add_fetch(&(s)->field, now_us() - (t0), __ATOMIC_RELAXED)

/* -- descriptor table ------------------------------------------------------ */

static void fd_entry_clear(FdShard *sh, FdEntry *e) {
    for (int i = 0; i < e->n; i++)
        if (e->fds[i] >= 0) {
            close(e->fds[i]);
            sh->fds--;
        }
    if (e->paths)
        for (int i = 0; i < e->n; i++)
            free(e->paths[i]);
    free(e->paths);
    free(e->fds);
    free(e->offs);
    memset(e, 0, sizeof *e);
}

static inline FdShard *shard_of(Session *s, uint64_t ino) {
    return &s->shards[(ino * 0x9E3779B97F4A7C15ULL) >> 58];
}

static inline unsigned slot_of(uint64_t ino) {
    return (unsigned)((ino * 0xC2B2AE3D27D4EB4FULL) >> 40) % SHARD_SLOTS;
}

/* Find ino's entry in a shard (linear probe over a few slots). */
#define PROBE 8
static FdEntry *shard_find(FdShard *sh, uint64_t ino) {
    unsigned s = slot_of(ino);
    for (int k = 0; k < PROBE; k++) {
        FdEntry *e = &sh->slots[(s + k) % SHARD_SLOTS];
        if (e->ino == ino)
            return e;
    }
    return NULL;
}

/* Evict entries other than keep (clock order; each is registered again on
 * its next read) until the shard can hold `more` descriptors more within its
 * share of the descriptor limit (write lock held). */
static void shard_make_room(Session *s, FdShard *sh, const FdEntry *keep, long more) {
    for (unsigned k = 0; k < SHARD_SLOTS && sh->fds + more > s->shard_fd_cap; k++) {
        FdEntry *v = &sh->slots[sh->victim++ % SHARD_SLOTS];
        if (v->ino && v != keep)
            fd_entry_clear(sh, v);
    }
}

/* Put entry *ne into the shard (write lock held), replacing ino's entry, else
 * in a free slot near home, else evicting one (re-registered on its next
 * read); then evict others while the shard holds more than its share of the
 * descriptor limit.  The table owns what *ne held from now on. */
static void shard_put(Session *s, FdShard *sh, FdEntry *ne) {
    FdEntry *e = shard_find(sh, ne->ino);
    if (!e) {
        unsigned h = slot_of(ne->ino);
        for (int k = 0; k < PROBE && !e; k++)
            if (sh->slots[(h + k) % SHARD_SLOTS].ino == 0)
                e = &sh->slots[(h + k) % SHARD_SLOTS];
        if (!e)
            e = &sh->slots[(h + (sh->victim++ % PROBE)) % SHARD_SLOTS];
    }
    if (e->ino)
        fd_entry_clear(sh, e);
    long held = 0;
    for (int i = 0; i < ne->n; i++)
        held += ne->fds[i] >= 0;
    shard_make_room(s, sh, e, held);
    *e = *ne;
    sh->fds += held;
}

static void table_drop(Session *s, uint64_t ino) {
    FdShard *sh = shard_of(s, ino);
    pthread_rwlock_wrlock(&sh->lock);
    FdEntry *e = shard_find(sh, ino);
    if (e)
        fd_entry_clear(sh, e);
    pthread_rwlock_unlock(&sh->lock);
}

/* Chunks of one entry whose objects C opens itself (see open_chunks). */
typedef struct {
    int count;
    int idx[AHEAD_MAX];
    char *paths[AHEAD_MAX]; /* copies, freed by open_chunks */
    uint64_t sizes[AHEAD_MAX];
    int check;
} OpenJob;

/* Add chunk i of e to job (read lock held); 0 when the job is full or out of memory. */
static int job_add(OpenJob *job, const FdEntry *e, int i) {
    if (job->count == AHEAD_MAX)
        return 0;
    char *copy = strdup(e->paths[i]);
    if (!copy)
        return 0;
    job->idx[job->count] = i;
    job->paths[job->count] = copy;
    job->sizes[job->count] = e->offs[i + 1] - e->offs[i];
    job->check = e->check_size;
    job->count++;
    return 1;
}

static void open_chunks(Session *s, uint64_t ino, OpenJob *job);

/* Answer a read from the table; returns 0 when not all of it is there.
 *
 * The shard's read lock is held only to find the entry and duplicate the
 * descriptors the read needs, not during the splice: a first read after the
 * page cache was dropped waits milliseconds for the disk, and a registration
 * in the same shard (which takes the write lock) would wait behind it, with
 * the reader that asked for it (measured: 6-17 ms per such set_fds in a
 * dropped-caches import).  The duplicates are closed after the reply; the
 * table's own descriptors are still only closed under the write lock.  If a
 * duplicate cannot be made (out of descriptors), the splice runs under the
 * lock as before.
 *
 * Chunks Python named (set_paths) are opened here: those this read needs
 * before it is answered, and, after it, those starting in the next
 * AHEAD_BYTES that no other read claimed (the entry's `ahead` mark), so the
 * disk is busy with them before the reader gets there. */
static int table_read_now(Session *s, fuse_req_t req, uint64_t ino, size_t size, off_t off,
                          OpenJob *ahead) {
    FdShard *sh = shard_of(s, ino);
    int tried = 0;
again:
    pthread_rwlock_rdlock(&sh->lock);
    FdEntry *e = shard_find(sh, ino);
    if (!e) {
        pthread_rwlock_unlock(&sh->lock);
        return 0;
    }
    uint64_t fsize = e->offs[e->n];
    uint64_t end = (uint64_t)off + size;
    if (end > fsize)
        end = fsize;
    if ((uint64_t)off >= end) {
        pthread_rwlock_unlock(&sh->lock);
        fuse_reply_buf(req, NULL, 0);
        return 1;
    }
    int lo = 0, hi = e->n - 1; /* chunk holding off */
    while (lo < hi) {
        int mid = (lo + hi + 1) / 2;
        if (e->offs[mid] <= (uint64_t)off)
            lo = mid;
        else
            hi = mid - 1;
    }
    if (e->paths && !ahead->count) {
        /* claim the chunks after this read's up to AHEAD_BYTES past its end */
        int from = lo, want;
        while (from < e->n && e->offs[from] < end)
            from++;
        for (want = from; want < e->n && e->offs[want] < end + AHEAD_BYTES; want++)
            ;
        int cur = __atomic_load_n(&e->ahead, __ATOMIC_RELAXED);
        if (cur < want &&
            __atomic_compare_exchange_n(&e->ahead, &cur, want, 0, __ATOMIC_RELAXED,
                                        __ATOMIC_RELAXED))
            for (int k = cur > from ? cur : from; k < want; k++)
                if (e->fds[k] < 0 && e->paths[k] && !job_add(ahead, e, k))
                    break;
    }
    /* fuse_bufvec ends in buf[1]; reached through a pointer, its array runs on
       into the storage behind it (a declared struct would make that UB). */
    _Alignas(struct fuse_bufvec) char storage[sizeof(struct fuse_bufvec) +
                                              (MAX_PIECES - 1) * sizeof(struct fuse_buf)];
    memset(storage, 0, sizeof storage);
    struct fuse_bufvec *v = (struct fuse_bufvec *)storage;
    size_t count = 0;
    uint64_t pos = (uint64_t)off;
    for (int i = lo; pos < end && i < e->n; i++) {
        if (count == MAX_PIECES || e->fds[i] < 0) { /* too many, or not opened */
            OpenJob now = {0};
            if (!tried && count < MAX_PIECES && e->paths)
                for (int k = i; k < e->n && e->offs[k] < end; k++)
                    if (e->fds[k] < 0 && e->paths[k] && !job_add(&now, e, k))
                        break;
            pthread_rwlock_unlock(&sh->lock);
            if (now.count) { /* open them, then answer from the table, else Python */
                open_chunks(s, ino, &now);
                tried = 1;
                goto again;
            }
            return 0;
        }
        uint64_t cend = e->offs[i + 1] < end ? e->offs[i + 1] : end;
        struct fuse_buf *fb = &v->buf[count++];
        fb->size = cend - pos;
        fb->flags = FUSE_BUF_IS_FD | FUSE_BUF_FD_SEEK;
        fb->fd = e->fds[i];
        fb->pos = (off_t)(pos - e->offs[i]);
        pos = cend;
    }
    v->count = count;
    int dups[MAX_PIECES];
    size_t ndup = 0;
    for (; ndup < count; ndup++) {
        dups[ndup] = fcntl(v->buf[ndup].fd, F_DUPFD_CLOEXEC, 0);
        if (dups[ndup] < 0)
            break;
    }
    if (ndup == count) {
        pthread_rwlock_unlock(&sh->lock);
        for (size_t i = 0; i < count; i++)
            v->buf[i].fd = dups[i];
        fuse_reply_data(req, v, FUSE_BUF_SPLICE_MOVE);
        for (size_t i = 0; i < count; i++)
            close(dups[i]);
    } else {
        for (size_t i = 0; i < ndup; i++)
            close(dups[i]);
        fuse_reply_data(req, v, FUSE_BUF_SPLICE_MOVE);
        pthread_rwlock_unlock(&sh->lock);
    }
    __atomic_add_fetch(&s->n_read_c, 1, __ATOMIC_RELAXED);
    return 1;
}

static int table_read(Session *s, fuse_req_t req, uint64_t ino, size_t size, off_t off) {
    OpenJob ahead = {0};
    int answered = table_read_now(s, req, ino, size, off, &ahead);
    if (ahead.count) /* after the answer (or before Python's): the reader's next chunks */
        open_chunks(s, ino, &ahead);
    return answered;
}

/* Open the verified objects of the chunks in job, without the GIL, and
 * install their descriptors where the entry still names the same objects
 * (another reader may have installed one first: that one stays).  An object
 * that is gone (evicted since) or not its chunk's size (cut by a crash) is
 * not tried again: its path is forgotten, and reads of that chunk go to
 * Python, which fetches or drops and fetches the object as a first read
 * always did.  Objects above READ_WHOLE are advised WILLNEED, as Python does
 * for what it opens: such an object is read whole far more often than not,
 * and a shared library mapped by the loader faults its pages in scattered.
 * Frees the job's paths. */
static void open_chunks(Session *s, uint64_t ino, OpenJob *job) {
    int fds[AHEAD_MAX];
    for (int j = 0; j < job->count; j++) {
        fds[j] = open(job->paths[j], O_RDONLY | O_CLOEXEC);
        struct stat st;
        if (fds[j] >= 0 && job->check &&
            (fstat(fds[j], &st) != 0 || (uint64_t)st.st_size != job->sizes[j])) {
            close(fds[j]);
            fds[j] = -1;
        }
        if (fds[j] >= 0 && job->sizes[j] > READ_WHOLE)
            posix_fadvise(fds[j], 0, 0, POSIX_FADV_WILLNEED);
    }
    FdShard *sh = shard_of(s, ino);
    unsigned long long installed = 0;
    pthread_rwlock_wrlock(&sh->lock);
    FdEntry *e = shard_find(sh, ino);
    for (int j = 0; j < job->count; j++) {
        int i = job->idx[j];
        int same = e && e->paths && i < e->n && e->fds[i] < 0 && e->paths[i] &&
                   strcmp(e->paths[i], job->paths[j]) == 0;
        if (same && fds[j] >= 0) {
            shard_make_room(s, sh, e, 1);
            e->fds[i] = fds[j];
            sh->fds++;
            fds[j] = -1;
            installed++;
        }
        if (same) { /* installed, or not to be tried again */
            free(e->paths[i]);
            e->paths[i] = NULL;
        }
    }
    pthread_rwlock_unlock(&sh->lock);
    for (int j = 0; j < job->count; j++) {
        if (fds[j] >= 0)
            close(fds[j]);
        free(job->paths[j]);
    }
    job->count = 0;
    if (installed)
        __atomic_add_fetch(&s->n_open_c, installed, __ATOMIC_RELAXED);
}

/* -- calling Python -------------------------------------------------------- */

/* Call ops.NAME(args); NULL (with the error printed) on an exception. */
static PyObject *call(Session *s, const char *name, PyObject *args) {
    PyObject *fn = PyObject_GetAttrString(s->ops, name);
    PyObject *r = NULL;
    if (fn && args)
        r = PyObject_CallObject(fn, args);
    Py_XDECREF(fn);
    Py_XDECREF(args);
    if (!r)
        PyErr_Print();
    return r;
}

/* An int result is an errno; NULL (exception) is EIO. Returns the errno or 0. */
static int result_errno(PyObject *r) {
    if (!r)
        return EIO;
    if (PyLong_Check(r)) {
        long v = PyLong_AsLong(r);
        return v > 0 ? (int)v : EIO;
    }
    return 0;
}

static void stat_from(struct stat *st, uint64_t ino, uint64_t mode, uint64_t nlink,
                      uint64_t size, int64_t mtime_ns) {
    memset(st, 0, sizeof *st);
    st->st_ino = ino;
    st->st_mode = (mode_t)mode;
    st->st_nlink = (nlink_t)nlink;
    st->st_size = (off_t)size;
    st->st_blksize = 65536;
    st->st_blocks = (blkcnt_t)((size + 511) / 512);
    st->st_mtim.tv_sec = mtime_ns / 1000000000LL;
    st->st_mtim.tv_nsec = mtime_ns % 1000000000LL;
    st->st_ctim = st->st_mtim;
    st->st_atim = st->st_mtim;
}

/* (ino, mode, nlink, size, mtime_ns) -> struct stat */
static int fill_stat(PyObject *t, struct stat *st) {
    unsigned long long ino, mode, nlink, size;
    long long mtime_ns;
    if (!PyArg_ParseTuple(t, "KKKKL", &ino, &mode, &nlink, &size, &mtime_ns)) {
        PyErr_Print();
        return -1;
    }
    stat_from(st, ino, mode, nlink, size, mtime_ns);
    return 0;
}

/* -- listing table ---------------------------------------------------------- */

static inline ListShard *lshard_of(Session *s, uint64_t ino) {
    return &s->lists[(ino * 0x9E3779B97F4A7C15ULL) >> 58];
}

static inline unsigned lbucket_of(uint64_t ino) {
    return (unsigned)((ino * 0xC2B2AE3D27D4EB4FULL) >> 40) % LIST_BUCKETS;
}

static void listing_free(Listing *l) {
    if (!l)
        return;
    free(l->ents);
    free(l->byname);
    free(l->names);
    free(l);
}

static Listing *listing_find(ListShard *sh, uint64_t ino) {
    for (Listing *l = sh->buckets[lbucket_of(ino)]; l; l = l->next)
        if (l->ino == ino)
            return l;
    return NULL;
}

static int byname_cmp(const void *a, const void *b, void *ents) {
    const DirEnt *e = ents;
    return strcmp(e[*(const uint32_t *)a].name, e[*(const uint32_t *)b].name);
}

static const DirEnt *listing_lookup(const Listing *l, const char *name) {
    size_t lo = 0, hi = l->n;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        const DirEnt *d = &l->ents[l->byname[mid]];
        int c = strcmp(name, d->name);
        if (c == 0)
            return d;
        if (c < 0)
            hi = mid;
        else
            lo = mid + 1;
    }
    return NULL;
}

/* Python's READDIR answer, a list of (name, (ino, mode, nlink, size,
 * mtime_ns)), as a listing; NULL if it is malformed.  Called with the GIL. */
static Listing *listing_from(PyObject *lst, uint64_t ino) {
    if (!PyList_Check(lst) || PyList_GET_SIZE(lst) > UINT32_MAX)
        return NULL;
    size_t n = (size_t)PyList_GET_SIZE(lst), total = 1;
    for (size_t i = 0; i < n; i++) {
        PyObject *item = PyList_GET_ITEM(lst, (Py_ssize_t)i);
        if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 2 ||
            !PyBytes_Check(PyTuple_GET_ITEM(item, 0)))
            return NULL;
        total += (size_t)PyBytes_GET_SIZE(PyTuple_GET_ITEM(item, 0)) + 1;
    }
    Listing *l = calloc(1, sizeof *l);
    if (!l)
        return NULL;
    l->ino = ino;
    l->n = n;
    l->bytes = (long)(sizeof *l + n * (sizeof(DirEnt) + sizeof(uint32_t)) + total);
    l->ents = malloc((n ? n : 1) * sizeof(DirEnt));
    l->byname = malloc((n ? n : 1) * sizeof(uint32_t));
    l->names = malloc(total);
    if (!l->ents || !l->byname || !l->names) {
        listing_free(l);
        return NULL;
    }
    char *at = l->names;
    for (size_t i = 0; i < n; i++) {
        PyObject *item = PyList_GET_ITEM(lst, (Py_ssize_t)i);
        PyObject *pname = PyTuple_GET_ITEM(item, 0);
        Py_ssize_t len = PyBytes_GET_SIZE(pname);
        unsigned long long eino, mode, nlink, size;
        long long mtime_ns;
        if (len == 0 || memchr(PyBytes_AS_STRING(pname), 0, (size_t)len) ||
            !PyArg_ParseTuple(PyTuple_GET_ITEM(item, 1), "KKKKL", &eino, &mode, &nlink, &size,
                              &mtime_ns)) {
            PyErr_Clear();
            listing_free(l);
            return NULL;
        }
        memcpy(at, PyBytes_AS_STRING(pname), (size_t)len);
        at[len] = 0;
        l->ents[i] = (DirEnt){eino, mode, nlink, size, mtime_ns, at};
        l->byname[i] = (uint32_t)i;
        at += len + 1;
    }
    qsort_r(l->byname, n, sizeof(uint32_t), byname_cmp, l->ents);
    return l;
}

static void dirent_param(Session *s, const DirEnt *d, struct fuse_entry_param *e) {
    memset(e, 0, sizeof *e);
    stat_from(&e->attr, d->ino, d->mode, d->nlink, d->size, d->mtime_ns);
    e->ino = d->ino;
    e->attr_timeout = s->entry_timeout;
    e->entry_timeout = s->entry_timeout;
}

/* A READDIR(PLUS) reply of at most size bytes from offset off: "." and ".."
 * are offsets 0 and 1, entry i is offset i + 2.  Returns the bytes used. */
static size_t listing_fill(Session *s, fuse_req_t req, fuse_ino_t ino, const Listing *l,
                           char *buf, size_t size, off_t off, int plus) {
    size_t used = 0;
    for (size_t i = (size_t)off; i < l->n + 2; i++) {
        struct fuse_entry_param e;
        const char *name;
        if (i < 2) { /* no attributes: the kernel links neither */
            memset(&e, 0, sizeof e);
            name = i == 0 ? "." : "..";
            e.attr.st_ino = ino;
            e.attr.st_mode = S_IFDIR;
        } else {
            dirent_param(s, &l->ents[i - 2], &e);
            name = l->ents[i - 2].name;
        }
        size_t want = plus ? fuse_add_direntry_plus(req, buf + used, size - used, name, &e,
                                                    (off_t)i + 1)
                           : fuse_add_direntry(req, buf + used, size - used, name, &e.attr,
                                               (off_t)i + 1);
        if (want > size - used)
            break;
        used += want;
    }
    return used;
}

/* Drop every listing (a revision switch: any of them may have changed).  A
 * listing made from an answer Python gave before this is not kept after it:
 * the generation moves first, and listing_keep checks it under the same
 * shard lock this takes to clear. */
static void listings_drop_all(Session *s) {
    __atomic_add_fetch(&s->list_gen, 1, __ATOMIC_SEQ_CST);
    for (int i = 0; i < LIST_SHARDS; i++) {
        ListShard *sh = &s->lists[i];
        long freed = 0;
        pthread_rwlock_wrlock(&sh->lock);
        for (int b = 0; b < LIST_BUCKETS; b++) {
            Listing *l = sh->buckets[b];
            sh->buckets[b] = NULL;
            while (l) {
                Listing *next = l->next;
                freed += l->bytes;
                listing_free(l);
                l = next;
            }
        }
        pthread_rwlock_unlock(&sh->lock);
        __atomic_sub_fetch(&s->listed, freed, __ATOMIC_RELAXED);
    }
}

/* Keep a listing made from an answer Python gave at generation gen (owned
 * from here: kept, or freed). */
static void listing_keep(Session *s, Listing *l, unsigned long long gen) {
    if (__atomic_add_fetch(&s->listed, l->bytes, __ATOMIC_RELAXED) > MAX_LISTED) {
        __atomic_sub_fetch(&s->listed, l->bytes, __ATOMIC_RELAXED);
        listing_free(l);
        listings_drop_all(s); /* bounded memory; they come back as directories are listed */
        return;
    }
    ListShard *sh = lshard_of(s, l->ino);
    long freed = 0;
    pthread_rwlock_wrlock(&sh->lock);
    if (__atomic_load_n(&s->list_gen, __ATOMIC_SEQ_CST) != gen) {
        freed = l->bytes;
        listing_free(l);
    } else {
        Listing **pp = &sh->buckets[lbucket_of(l->ino)];
        while (*pp && (*pp)->ino != l->ino)
            pp = &(*pp)->next;
        if (*pp) { /* listed again meanwhile: the newer answer replaces it */
            Listing *old = *pp;
            *pp = old->next;
            freed = old->bytes;
            listing_free(old);
        }
        l->next = sh->buckets[lbucket_of(l->ino)];
        sh->buckets[lbucket_of(l->ino)] = l;
    }
    pthread_rwlock_unlock(&sh->lock);
    __atomic_sub_fetch(&s->listed, freed, __ATOMIC_RELAXED);
}

/* -- operations --------------------------------------------------------------- */

static void ll_init(void *userdata, struct fuse_conn_info *conn) {
    Session *s = userdata;
    if (conn->capable & FUSE_CAP_READDIRPLUS)
        conn->want |= FUSE_CAP_READDIRPLUS;
    conn->want &= ~FUSE_CAP_READDIRPLUS_AUTO; /* always PLUS: a listing fills the dentries */
    if (conn->capable & FUSE_CAP_SPLICE_WRITE)
        conn->want |= FUSE_CAP_SPLICE_WRITE | FUSE_CAP_SPLICE_MOVE;
    if (conn->capable & FUSE_CAP_CACHE_SYMLINKS)
        conn->want |= FUSE_CAP_CACHE_SYMLINKS;
    conn->want &= ~FUSE_CAP_AUTO_INVAL_DATA; /* content never changes under an inode */
    conn->max_readahead = 4 << 20;
    /* Read-only, so max_write only sizes max_pages, hence READs.  libfuse
       splices a reply through a pipe of the READ's size plus a few pages; a
       pipe above fs.pipe-max-size (1 MiB) needs CAP_SYS_RESOURCE, and
       without it every 1 MiB READ was copied through this process. */
    conn->max_write = READ_MAX;
    /* Readahead of a page-cached file is an asynchronous ("background") READ,
       and the kernel keeps at most max_background of those in flight (12 by
       default): 64 readers of dropped files would wait in the kernel's queue
       while worker threads idle. */
    conn->max_background = BACKGROUND;
    conn->congestion_threshold = BACKGROUND * 3 / 4;
    PyGILState_STATE g = PyGILState_Ensure();
    Py_XDECREF(call(s, "init", PyTuple_New(0)));
    PyGILState_Release(g);
}

static void ll_destroy(void *userdata) {
    Session *s = userdata;
    PyGILState_STATE g = PyGILState_Ensure();
    Py_XDECREF(call(s, "destroy", PyTuple_New(0)));
    PyGILState_Release(g);
}

static void reply_entry_from(Session *s, fuse_req_t req, PyObject *r) {
    struct fuse_entry_param e;
    memset(&e, 0, sizeof e);
    if (r == Py_None) { /* negative: cached by the kernel until invalidated */
        e.ino = 0;
        e.entry_timeout = s->negative_timeout;
        fuse_reply_entry(req, &e);
        return;
    }
    if (fill_stat(r, &e.attr) < 0) {
        fuse_reply_err(req, EIO);
        return;
    }
    e.ino = e.attr.st_ino;
    e.attr_timeout = s->entry_timeout;
    e.entry_timeout = s->entry_timeout;
    fuse_reply_entry(req, &e);
}

static void ll_lookup(fuse_req_t req, fuse_ino_t parent, const char *name) {
    Session *s = fuse_req_userdata(req);
    __atomic_add_fetch(&s->n_lookup, 1, __ATOMIC_RELAXED);
    ListShard *sh = lshard_of(s, parent);
    pthread_rwlock_rdlock(&sh->lock);
    const Listing *l = listing_find(sh, parent);
    if (l) { /* listed before: the name is there, or absent */
        struct fuse_entry_param e;
        const DirEnt *d = listing_lookup(l, name);
        if (d)
            dirent_param(s, d, &e);
        else {
            memset(&e, 0, sizeof e);
            e.entry_timeout = s->negative_timeout;
        }
        pthread_rwlock_unlock(&sh->lock);
        __atomic_add_fetch(&s->n_lookup_c, 1, __ATOMIC_RELAXED);
        fuse_reply_entry(req, &e);
        return;
    }
    pthread_rwlock_unlock(&sh->lock);
    unsigned long long t0 = now_us();
    PyGILState_STATE g = PyGILState_Ensure();
    PyObject *r = call(s, "lookup", Py_BuildValue("(Ky)", (unsigned long long)parent, name));
    int err = r == Py_None ? 0 : result_errno(r);
    if (err)
        fuse_reply_err(req, err);
    else
        reply_entry_from(s, req, r);
    Py_XDECREF(r);
    PyGILState_Release(g);
    SPENT(s, us_lookup, t0);
}

static void ll_getattr(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi) {
    (void)fi;
    Session *s = fuse_req_userdata(req);
    __atomic_add_fetch(&s->n_getattr, 1, __ATOMIC_RELAXED);
    unsigned long long t0 = now_us();
    PyGILState_STATE g = PyGILState_Ensure();
    PyObject *r = call(s, "getattr", Py_BuildValue("(K)", (unsigned long long)ino));
    int err = r == Py_None ? ENOENT : result_errno(r);
    struct stat st;
    if (!err && fill_stat(r, &st) < 0)
        err = EIO;
    Py_XDECREF(r);
    PyGILState_Release(g);
    SPENT(s, us_getattr, t0);
    if (err)
        fuse_reply_err(req, err);
    else
        fuse_reply_attr(req, &st, s->entry_timeout);
}

static void ll_readlink(fuse_req_t req, fuse_ino_t ino) {
    Session *s = fuse_req_userdata(req);
    PyGILState_STATE g = PyGILState_Ensure();
    PyObject *r = call(s, "readlink", Py_BuildValue("(K)", (unsigned long long)ino));
    int err = result_errno(r);
    if (!err && !PyBytes_Check(r))
        err = EIO;
    if (err)
        fuse_reply_err(req, err);
    else
        fuse_reply_readlink(req, PyBytes_AS_STRING(r));
    Py_XDECREF(r);
    PyGILState_Release(g);
}

static void ll_open(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi) {
    Session *s = fuse_req_userdata(req);
    __atomic_add_fetch(&s->n_open, 1, __ATOMIC_RELAXED);
    if ((fi->flags & O_ACCMODE) != O_RDONLY || (fi->flags & (O_TRUNC | O_APPEND))) {
        fuse_reply_err(req, EROFS);
        return;
    }
    if (s->no_open) { /* the kernel stops sending OPEN; files keep their page cache */
        fuse_reply_err(req, ENOSYS);
        return;
    }
    if (ino & STREAM_BIT)
        fi->direct_io = 1;
    else
        fi->keep_cache = 1;
    fi->noflush = 1; /* nothing to flush on close: no FLUSH round trip */
    fuse_reply_open(req, fi);
}

static void ll_opendir(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi) {
    (void)ino;
    (void)fi;
    Session *s = fuse_req_userdata(req);
    __atomic_add_fetch(&s->n_opendir, 1, __ATOMIC_RELAXED);
    /* ENOSYS: the kernel stops sending OPENDIR and caches listings
       (FOPEN_KEEP_CACHE | FOPEN_CACHE_DIR) until the inode is invalidated. */
    fuse_reply_err(req, ENOSYS);
}

/* Reply with what ops.read returned: bytes, or an errno (consumes r). */
static void reply_read_result(fuse_req_t req, PyObject *r) {
    int err = result_errno(r);
    if (!err && PyBytes_Check(r)) {
        fuse_reply_buf(req, PyBytes_AS_STRING(r), (size_t)PyBytes_GET_SIZE(r));
        Py_DECREF(r);
        return;
    }
    Py_XDECREF(r);
    fuse_reply_err(req, err ? err : EIO);
}

static void ll_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
                    struct fuse_file_info *fi) {
    (void)fi;
    Session *s = fuse_req_userdata(req);
    if (table_read(s, req, ino, size, off))
        return;
    __atomic_add_fetch(&s->n_read_py, 1, __ATOMIC_RELAXED);
    unsigned long long t0 = now_us();
    PyGILState_STATE g = PyGILState_Ensure();
    PyObject *r = call(s, "read", Py_BuildValue("(KnL)", (unsigned long long)ino,
                                                (Py_ssize_t)size, (long long)off));
    SPENT(s, us_read_py, t0);
    if (r != Py_None) {
        reply_read_result(req, r);
        PyGILState_Release(g);
        return;
    }
    /* The descriptors were registered: serve from the table. */
    Py_DECREF(r);
    PyGILState_Release(g);
    if (table_read(s, req, ino, size, off))
        return;
    /* Other registrations evicted them meanwhile (a full table under many
       readers): the bytes through Python this once (register=False). */
    g = PyGILState_Ensure();
    r = call(s, "read", Py_BuildValue("(KnLO)", (unsigned long long)ino, (Py_ssize_t)size,
                                      (long long)off, Py_False));
    if (r == Py_None) { /* not with register=False; a bug if seen */
        Py_DECREF(r);
        r = NULL;
    }
    reply_read_result(req, r);
    PyGILState_Release(g);
}

/* Fill buf from the listing table; -1 when the directory is not in it, else
 * the bytes used. */
static long listed_fill(Session *s, fuse_req_t req, fuse_ino_t ino, char *buf, size_t size,
                        off_t off, int plus) {
    ListShard *sh = lshard_of(s, ino);
    pthread_rwlock_rdlock(&sh->lock);
    const Listing *l = listing_find(sh, ino);
    long used = l ? (long)listing_fill(s, req, ino, l, buf, size, off, plus) : -1;
    pthread_rwlock_unlock(&sh->lock);
    return used;
}

/* The root's listing is never kept: a node's root lists only the
 * repositories that are loaded, and a lookup must still find one that
 * loads later without a switch. */
static void ll_readdir_common(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, int plus) {
    Session *s = fuse_req_userdata(req);
    __atomic_add_fetch(&s->n_readdir, 1, __ATOMIC_RELAXED);
    char *buf = malloc(size);
    if (!buf) {
        fuse_reply_err(req, ENOMEM);
        return;
    }
    int keep = ino != FUSE_ROOT_ID;
    long used = keep ? listed_fill(s, req, ino, buf, size, off, plus) : -1;
    if (used >= 0) {
        __atomic_add_fetch(&s->n_readdir_c, 1, __ATOMIC_RELAXED);
        fuse_reply_buf(req, buf, (size_t)used);
        free(buf);
        return;
    }
    unsigned long long gen = __atomic_load_n(&s->list_gen, __ATOMIC_SEQ_CST);
    unsigned long long t0 = now_us();
    PyGILState_STATE g = PyGILState_Ensure();
    PyObject *r = call(s, "readdir", Py_BuildValue("(K)", (unsigned long long)ino));
    SPENT(s, us_readdir, t0);
    int err = result_errno(r);
    Listing *l = err ? NULL : listing_from(r, ino);
    Py_XDECREF(r);
    PyGILState_Release(g);
    if (err || !l) {
        fuse_reply_err(req, err ? err : EIO);
        free(buf);
        return;
    }
    fuse_reply_buf(req, buf, listing_fill(s, req, ino, l, buf, size, off, plus));
    free(buf);
    if (keep)
        listing_keep(s, l, gen);
    else
        listing_free(l);
}

static void ll_readdir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
                       struct fuse_file_info *fi) {
    (void)fi;
    ll_readdir_common(req, ino, size, off, 0);
}

static void ll_readdirplus(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
                           struct fuse_file_info *fi) {
    (void)fi;
    ll_readdir_common(req, ino, size, off, 1);
}

static void ll_forget(fuse_req_t req, fuse_ino_t ino, uint64_t nlookup) {
    (void)nlookup;
    Session *s = fuse_req_userdata(req);
    /* The kernel dropped its inode: no read of it can be in flight. */
    table_drop(s, ino);
    PyGILState_STATE g = PyGILState_Ensure();
    Py_XDECREF(call(s, "forget", Py_BuildValue("([K])", (unsigned long long)ino)));
    PyGILState_Release(g);
    fuse_reply_none(req);
}

static void ll_forget_multi(fuse_req_t req, size_t count, struct fuse_forget_data *forgets) {
    Session *s = fuse_req_userdata(req);
    for (size_t i = 0; i < count; i++)
        table_drop(s, forgets[i].ino);
    PyGILState_STATE g = PyGILState_Ensure();
    PyObject *lst = PyList_New((Py_ssize_t)count);
    for (size_t i = 0; lst && i < count; i++)
        PyList_SET_ITEM(lst, (Py_ssize_t)i, PyLong_FromUnsignedLongLong(forgets[i].ino));
    if (lst)
        Py_XDECREF(call(s, "forget", Py_BuildValue("(N)", lst)));
    else
        PyErr_Clear();
    PyGILState_Release(g);
    fuse_reply_none(req);
}

static void ll_statfs(fuse_req_t req, fuse_ino_t ino) {
    (void)ino;
    Session *s = fuse_req_userdata(req);
    PyGILState_STATE g = PyGILState_Ensure();
    PyObject *r = call(s, "statfs", PyTuple_New(0));
    unsigned long long bytes = 0, files = 0;
    int err = result_errno(r);
    if (!err && !PyArg_ParseTuple(r, "KK", &bytes, &files)) {
        PyErr_Clear();
        err = EIO;
    }
    Py_XDECREF(r);
    PyGILState_Release(g);
    if (err) {
        fuse_reply_err(req, err);
        return;
    }
    struct statvfs st;
    memset(&st, 0, sizeof st);
    st.f_bsize = 4096;
    st.f_frsize = 4096;
    st.f_blocks = (bytes + 4095) / 4096;
    st.f_files = files;
    st.f_namemax = 255;
    fuse_reply_statfs(req, &st);
}

/* GETXATTR and LISTXATTR answer alike: a size probe (size 0), ERANGE when
 * the caller's buffer is too small, else the bytes.  Called with the GIL;
 * takes the reference to r. */
static void reply_xattr_bytes(fuse_req_t req, PyObject *r, size_t size) {
    int err = result_errno(r);
    if (!err && !PyBytes_Check(r))
        err = EIO;
    if (err)
        fuse_reply_err(req, err);
    else if (size == 0)
        fuse_reply_xattr(req, (size_t)PyBytes_GET_SIZE(r));
    else if ((size_t)PyBytes_GET_SIZE(r) > size)
        fuse_reply_err(req, ERANGE);
    else
        fuse_reply_buf(req, PyBytes_AS_STRING(r), (size_t)PyBytes_GET_SIZE(r));
    Py_XDECREF(r);
}

static void ll_getxattr(fuse_req_t req, fuse_ino_t ino, const char *name, size_t size) {
    Session *s = fuse_req_userdata(req);
    PyGILState_STATE g = PyGILState_Ensure();
    reply_xattr_bytes(
        req, call(s, "getxattr", Py_BuildValue("(Ky)", (unsigned long long)ino, name)), size);
    PyGILState_Release(g);
}

static void ll_listxattr(fuse_req_t req, fuse_ino_t ino, size_t size) {
    Session *s = fuse_req_userdata(req);
    PyGILState_STATE g = PyGILState_Ensure();
    /* names, each NUL-terminated */
    reply_xattr_bytes(req, call(s, "listxattr", Py_BuildValue("(K)", (unsigned long long)ino)), size);
    PyGILState_Release(g);
}

static const struct fuse_lowlevel_ops ll_ops = {
    .init = ll_init,
    .destroy = ll_destroy,
    .lookup = ll_lookup,
    .forget = ll_forget,
    .forget_multi = ll_forget_multi,
    .getattr = ll_getattr,
    .readlink = ll_readlink,
    .open = ll_open,
    .read = ll_read,
    .opendir = ll_opendir,
    .readdir = ll_readdir,
    .readdirplus = ll_readdirplus,
    .statfs = ll_statfs,
    .getxattr = ll_getxattr,
    .listxattr = ll_listxattr,
};

/* -- the Session type ------------------------------------------------------- */

static int Session_init(Session *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"ops",     "mountpoint", "options", "entry_timeout",
                             "negative_timeout", "no_open", "signals", "max_fds", NULL};
    PyObject *ops, *options;
    const char *mountpoint;
    double et, nt;
    int no_open, signals;
    long max_fds;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OsO!ddppl", kwlist, &ops, &mountpoint,
                                     &PyList_Type, &options, &et, &nt, &no_open, &signals,
                                     &max_fds))
        return -1;
    self->shard_fd_cap = max_fds / SHARDS > 1 ? max_fds / SHARDS : 1;
    if (self->se) {
        PyErr_SetString(PyExc_RuntimeError, "session already initialised");
        return -1;
    }
    Py_INCREF(ops);
    self->ops = ops;
    self->entry_timeout = et;
    self->negative_timeout = nt;
    self->no_open = no_open;
    self->signals = signals;
    self->shards = calloc(SHARDS, sizeof(FdShard));
    if (!self->shards) {
        PyErr_NoMemory();
        return -1;
    }
    for (int i = 0; i < SHARDS; i++)
        pthread_rwlock_init(&self->shards[i].lock, NULL);
    pthread_mutex_init(&self->notify_lock, NULL);
    self->lists = calloc(LIST_SHARDS, sizeof(ListShard));
    if (!self->lists) {
        PyErr_NoMemory();
        return -1;
    }
    for (int i = 0; i < LIST_SHARDS; i++)
        pthread_rwlock_init(&self->lists[i].lock, NULL);

    Py_ssize_t n = PyList_GET_SIZE(options);
    char **argv = calloc((size_t)n + 2, sizeof(char *));
    argv[0] = "swarm";
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *o = PyList_GET_ITEM(options, i);
        if (!PyUnicode_Check(o)) {
            free(argv);
            PyErr_SetString(PyExc_TypeError, "options must be str");
            return -1;
        }
        argv[i + 1] = (char *)PyUnicode_AsUTF8(o);
    }
    struct fuse_args fargs = FUSE_ARGS_INIT((int)n + 1, argv);
    self->se = fuse_session_new(&fargs, &ll_ops, sizeof ll_ops, self);
    fuse_opt_free_args(&fargs);
    free(argv);
    if (!self->se) {
        PyErr_SetString(PyExc_RuntimeError, "fuse_session_new failed (bad options?)");
        return -1;
    }
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = fuse_session_mount(self->se, mountpoint);
    Py_END_ALLOW_THREADS
    if (rc != 0) {
        fuse_session_destroy(self->se);
        self->se = NULL;
        PyErr_Format(PyExc_RuntimeError, "fuse_session_mount of %s failed", mountpoint);
        return -1;
    }
    self->mounted = 1;
    return 0;
}

static PyObject *Session_loop(Session *self, PyObject *args) {
    unsigned int threads;
    if (!PyArg_ParseTuple(args, "I", &threads))
        return NULL;
    if (!self->se || !self->mounted) {
        PyErr_SetString(PyExc_RuntimeError, "not mounted");
        return NULL;
    }
    if (self->signals && fuse_set_signal_handlers(self->se) != 0) {
        PyErr_SetString(PyExc_RuntimeError, "cannot set signal handlers");
        return NULL;
    }
    int rc;
    Py_BEGIN_ALLOW_THREADS
    struct fuse_loop_config *cfg = fuse_loop_cfg_create();
    fuse_loop_cfg_set_max_threads(cfg, threads);
    fuse_loop_cfg_set_idle_threads(cfg, threads); /* keep them all: no reaping */
    rc = fuse_session_loop_mt(self->se, cfg);
    fuse_loop_cfg_destroy(cfg);
    pthread_mutex_lock(&self->notify_lock);
    if (self->signals)
        fuse_remove_signal_handlers(self->se);
    fuse_session_unmount(self->se);
    self->mounted = 0;
    pthread_mutex_unlock(&self->notify_lock);
    Py_END_ALLOW_THREADS
    return PyLong_FromLong(rc);
}

static PyObject *Session_exit(Session *self, PyObject *unused) {
    (void)unused;
    if (self->se)
        fuse_session_exit(self->se);
    Py_RETURN_NONE;
}

static PyObject *Session_inval_entry(Session *self, PyObject *args) {
    unsigned long long parent;
    const char *name;
    Py_ssize_t len;
    if (!PyArg_ParseTuple(args, "Ky#", &parent, &name, &len))
        return NULL;
    int rc = -ENOTCONN;
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&self->notify_lock);
    if (self->se && self->mounted)
        rc = fuse_lowlevel_notify_inval_entry(self->se, parent, name, (size_t)len);
    pthread_mutex_unlock(&self->notify_lock);
    Py_END_ALLOW_THREADS
    return PyLong_FromLong(rc);
}

static PyObject *Session_inval_inode(Session *self, PyObject *args) {
    unsigned long long ino;
    long long off, len;
    if (!PyArg_ParseTuple(args, "KLL", &ino, &off, &len))
        return NULL;
    int rc = -ENOTCONN;
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&self->notify_lock);
    if (self->se && self->mounted)
        rc = fuse_lowlevel_notify_inval_inode(self->se, ino, off, len);
    pthread_mutex_unlock(&self->notify_lock);
    Py_END_ALLOW_THREADS
    return PyLong_FromLong(rc);
}

/* set_fds(ino, fds, offsets): the table owns fds from now on (len(offsets) == len(fds) + 1). */
static PyObject *Session_set_fds(Session *self, PyObject *args) {
    unsigned long long ino;
    PyObject *fds, *offs;
    if (!PyArg_ParseTuple(args, "KO!O!", &ino, &PyList_Type, &fds, &PyList_Type, &offs))
        return NULL;
    Py_ssize_t n = PyList_GET_SIZE(fds);
    if (n < 1 || n > 1 << 20 || PyList_GET_SIZE(offs) != n + 1) {
        PyErr_SetString(PyExc_ValueError, "set_fds: need n >= 1 fds and n + 1 offsets");
        return NULL;
    }
    FdEntry ne = {.ino = ino, .n = (int)n};
    ne.fds = malloc(sizeof(int) * (size_t)n);
    ne.offs = malloc(sizeof(uint64_t) * (size_t)(n + 1));
    if (!ne.fds || !ne.offs) {
        free(ne.fds);
        free(ne.offs);
        return PyErr_NoMemory();
    }
    for (Py_ssize_t i = 0; i < n; i++)
        ne.fds[i] = (int)PyLong_AsLong(PyList_GET_ITEM(fds, i));
    for (Py_ssize_t i = 0; i <= n; i++)
        ne.offs[i] = PyLong_AsUnsignedLongLong(PyList_GET_ITEM(offs, i));
    if (PyErr_Occurred()) {
        free(ne.fds);
        free(ne.offs);
        return NULL;
    }
    FdShard *sh = shard_of(self, ino);
    /* With the GIL held: readers hold the read lock only to find and
       duplicate descriptors (microseconds) and never take the GIL, so the
       wait is short and cannot deadlock; releasing the GIL here cost a
       reacquisition behind other Python threads on every registration. */
    pthread_rwlock_wrlock(&sh->lock);
    shard_put(self, sh, &ne);
    pthread_rwlock_unlock(&sh->lock);
    Py_RETURN_NONE;
}

/* set_paths(ino, paths, offsets, check_size): until ino has an entry, reads
 * of chunk i (offsets[i] to offsets[i+1]) open the verified object at
 * paths[i] in C (open_chunks); an entry already there is kept. */
static PyObject *Session_set_paths(Session *self, PyObject *args) {
    unsigned long long ino;
    PyObject *paths, *offs;
    int check;
    if (!PyArg_ParseTuple(args, "KO!O!p", &ino, &PyList_Type, &paths, &PyList_Type, &offs,
                          &check))
        return NULL;
    Py_ssize_t n = PyList_GET_SIZE(paths);
    if (n < 1 || n > 1 << 20 || PyList_GET_SIZE(offs) != n + 1) {
        PyErr_SetString(PyExc_ValueError, "set_paths: need n >= 1 paths and n + 1 offsets");
        return NULL;
    }
    FdEntry ne = {.ino = ino, .n = (int)n, .check_size = check};
    ne.fds = malloc(sizeof(int) * (size_t)n);
    ne.offs = malloc(sizeof(uint64_t) * (size_t)(n + 1));
    ne.paths = calloc((size_t)n, sizeof(char *));
    int ok = ne.fds && ne.offs && ne.paths;
    for (Py_ssize_t i = 0; ok && i < n; i++) {
        PyObject *p = PyList_GET_ITEM(paths, i);
        char *b;
        Py_ssize_t len;
        if (!PyBytes_Check(p) || PyBytes_AsStringAndSize(p, &b, &len) < 0 ||
            (size_t)len >= PATH_MAX || strlen(b) != (size_t)len) {
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_ValueError, "set_paths: not a path");
            ok = 0;
            break;
        }
        ne.fds[i] = -1;
        ne.paths[i] = strdup(b);
        ok = ne.paths[i] != NULL;
    }
    for (Py_ssize_t i = 0; ok && i <= n; i++)
        ne.offs[i] = PyLong_AsUnsignedLongLong(PyList_GET_ITEM(offs, i));
    if (ok && PyErr_Occurred())
        ok = 0;
    int known = 1;
    if (ok) {
        FdShard *sh = shard_of(self, ino);
        pthread_rwlock_wrlock(&sh->lock); /* with the GIL: see set_fds */
        known = shard_find(sh, ino) != NULL;
        if (!known)
            shard_put(self, sh, &ne);
        pthread_rwlock_unlock(&sh->lock);
    }
    if (known) { /* not taken: the table keeps what it has, or an error */
        if (ne.paths)
            for (Py_ssize_t i = 0; i < n; i++)
                free(ne.paths[i]);
        free(ne.paths);
        free(ne.fds);
        free(ne.offs);
    }
    if (!ok)
        return PyErr_Occurred() ? NULL : PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyObject *Session_drop_fds(Session *self, PyObject *args) {
    unsigned long long ino;
    if (!PyArg_ParseTuple(args, "K", &ino))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    table_drop(self, ino);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *Session_drop_listings(Session *self, PyObject *unused) {
    (void)unused;
    if (self->lists) {
        Py_BEGIN_ALLOW_THREADS
        listings_drop_all(self);
        Py_END_ALLOW_THREADS
    }
    Py_RETURN_NONE;
}

static PyObject *Session_fd(Session *self, PyObject *unused) {
    (void)unused;
    return PyLong_FromLong(self->se ? fuse_session_fd(self->se) : -1);
}

static PyObject *Session_counters(Session *self, PyObject *unused) {
    (void)unused;
    return Py_BuildValue("{sKsKsKsKsKsKsKsKsKsKsKsKsKsKsl}", "open", self->n_open, "opendir",
                         self->n_opendir, "read_c", self->n_read_c, "read_py", self->n_read_py,
                         "lookup", self->n_lookup, "lookup_c", self->n_lookup_c, "readdir",
                         self->n_readdir, "readdir_c", self->n_readdir_c, "getattr",
                         self->n_getattr, "lookup_us", self->us_lookup, "read_py_us",
                         self->us_read_py, "readdir_us", self->us_readdir, "getattr_us",
                         self->us_getattr, "open_c", self->n_open_c, "listed", self->listed);
}

static void Session_dealloc(Session *self) {
    if (self->se) {
        if (self->mounted)
            fuse_session_unmount(self->se);
        fuse_session_destroy(self->se);
        self->se = NULL;
    }
    if (self->shards) {
        for (int i = 0; i < SHARDS; i++)
            for (int j = 0; j < SHARD_SLOTS; j++)
                if (self->shards[i].slots[j].ino)
                    fd_entry_clear(&self->shards[i], &self->shards[i].slots[j]);
        free(self->shards);
    }
    if (self->lists) {
        listings_drop_all(self);
        free(self->lists);
    }
    Py_XDECREF(self->ops);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef Session_methods[] = {
    {"loop", (PyCFunction)Session_loop, METH_VARARGS, "loop(threads): serve until unmounted"},
    {"exit", (PyCFunction)Session_exit, METH_NOARGS, "ask the loop to stop"},
    {"inval_entry", (PyCFunction)Session_inval_entry, METH_VARARGS,
     "inval_entry(parent, name) -> 0 or -errno: drop a (negative) dentry"},
    {"inval_inode", (PyCFunction)Session_inval_inode, METH_VARARGS,
     "inval_inode(ino, off, len) -> 0 or -errno: drop attributes and cached pages"},
    {"set_fds", (PyCFunction)Session_set_fds, METH_VARARGS,
     "set_fds(ino, fds, offsets): serve reads of ino from these descriptors (owned from now)"},
    {"drop_fds", (PyCFunction)Session_drop_fds, METH_VARARGS, "drop_fds(ino)"},
    {"drop_listings", (PyCFunction)Session_drop_listings, METH_NOARGS,
     "forget every directory listing kept in C (a revision switch)"},
    {"fd", (PyCFunction)Session_fd, METH_NOARGS, "the /dev/fuse descriptor"},
    {"counters", (PyCFunction)Session_counters, METH_NOARGS, "requests seen, by kind"},
    {"set_paths", (PyCFunction)Session_set_paths, METH_VARARGS,
     "set_paths(ino, paths, offsets, check_size): the objects C opens on reads of ino's chunks"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject SessionType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "cvmfs_like._fusell.Session",
    .tp_basicsize = sizeof(Session),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Session_init,
    .tp_dealloc = (destructor)Session_dealloc,
    .tp_methods = Session_methods,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_fusell", "libfuse 3 low-level binding of cvmfs_like.fs", -1, NULL,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__fusell(void) {
    if (PyType_Ready(&SessionType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (!m)
        return NULL;
    Py_INCREF(&SessionType);
    PyModule_AddObject(m, "Session", (PyObject *)&SessionType);
    PyModule_AddIntConstant(m, "STREAM_BIT_SHIFT", 62);
    return m;
}
