/* Allocator scenarios for vmatrace's --heap tests (tracer/tests/heap.rs compiles this with
 * gcc). Each mode prints what it did; "checkpoint" lines are followed by a SIGSTOP, at which
 * the test compares vmatrace with glibc's own figures (mallinfo2, malloc_info). */
#define _GNU_SOURCE
#include <fcntl.h>
#include <malloc.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static const char *info_prefix = "/tmp/heap-workload";

/* With open and read, not stdio: a FILE is a malloc'd block that would stay in the heap
 * (a freed FILE goes to glibc's per-thread cache) and pin its top. */
static long rss_kib(void) {
    char buf[4096];
    int fd = open("/proc/self/status", O_RDONLY);
    if (fd < 0)
        return -1;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0)
        return -1;
    buf[n] = 0;
    const char *at = strstr(buf, "VmRSS:");
    long kib = -1;
    if (at)
        sscanf(at, "VmRSS: %ld kB", &kib);
    return kib;
}

/* glibc's figures, then a stop: "checkpoint NAME UORDBLKS HBLKHD RSS_KIB INFO_FILE". */
static void checkpoint(const char *name) {
    struct mallinfo2 m = mallinfo2();
    char path[512];
    snprintf(path, sizeof path, "%s.%s.xml", info_prefix, name);
    FILE *f = fopen(path, "w");
    if (f) {
        malloc_info(0, f);
        fclose(f);
    }
    printf("checkpoint %s %zu %zu %ld %s\n", name, m.uordblks, m.hblkhd, rss_kib(), path);
    fflush(stdout);
    raise(SIGSTOP);
}

static void *xmalloc(size_t n) {
    void *p = malloc(n);
    if (!p) {
        perror("malloc");
        exit(1);
    }
    memset(p, 1, n);
    return p;
}

/* ---- checkpoints: every glibc allocation function, frees, reallocs, threads ---- */

#define THREADS 3
static pthread_barrier_t ready, done;

static void *worker(void *arg) {
    long k = (long)arg;
    /* (k + 1) MiB in 1000-byte blocks; every fourth freed. */
    size_t n = (size_t)(k + 1) * 1024 * 1024 / 1000;
    void **p = calloc(n, sizeof *p);
    for (size_t i = 0; i < n; i++)
        p[i] = xmalloc(1000);
    for (size_t i = 0; i < n; i += 4)
        free(p[i]);
    pthread_barrier_wait(&ready);
    pthread_barrier_wait(&done);
    return NULL;
}

static void checkpoints(void) {
    enum { N = 20000 };
    static void *p[N];
    static size_t sz[N];
    for (int i = 0; i < N; i++) {
        sz[i] = 16 + (size_t)(i * 37) % 2000;
        p[i] = (i % 5 == 0) ? calloc(1, sz[i]) : malloc(sz[i]);
        memset(p[i], 1, sz[i]);
    }
    void *big[4];
    size_t bigs[4] = {200 << 10, 1 << 20, 300 << 10, 3 << 20};
    for (int i = 0; i < 4; i++)
        big[i] = xmalloc(bigs[i]);
    void *a = NULL;
    if (posix_memalign(&a, 4096, 10000))
        exit(1);
    void *b = memalign(256, 5000);
    void *c = aligned_alloc(64, 640);
    void *d = valloc(3000);
    void *e = pvalloc(5000);
    void *f = reallocarray(NULL, 100, 30);
    void *g = NULL;
    if (posix_memalign(&g, 65536, 400 << 10)) /* mmapped, with an alignment offset */
        exit(1);
    checkpoint("allocated");

    for (int i = 0; i < N; i += 3) {
        free(p[i]);
        p[i] = NULL;
    }
    for (int i = 1; i < N; i += 7) {
        p[i] = realloc(p[i], sz[i] * 2);
        memset(p[i], 2, sz[i] * 2);
    }
    free(big[1]);
    big[0] = realloc(big[0], 2 << 20);
    free(b);
    free(d);
    f = realloc(f, 0); /* frees */
    checkpoint("freed");

    pthread_t t[THREADS];
    pthread_barrier_init(&ready, NULL, THREADS + 1);
    pthread_barrier_init(&done, NULL, THREADS + 1);
    for (long k = 0; k < THREADS; k++)
        pthread_create(&t[k], NULL, worker, (void *)k);
    pthread_barrier_wait(&ready);
    checkpoint("threads");
    pthread_barrier_wait(&done);
    for (int k = 0; k < THREADS; k++)
        pthread_join(t[k], NULL);
    checkpoint("joined");
    (void)a, (void)c, (void)e, (void)f, (void)g;
}

/* ---- attach: a baseline, a stop for vmatrace to attach, then allocations ---- */

static void attach(void) {
    /* Some memory from before vmatrace attaches. */
    void *old[1000];
    for (int i = 0; i < 1000; i++)
        old[i] = xmalloc(100 + i);
    struct mallinfo2 m = mallinfo2();
    printf("baseline %zu %zu\n", m.uordblks, m.hblkhd);
    fflush(stdout);
    raise(SIGSTOP); /* the test attaches vmatrace and continues us */
    enum { N = 30000 };
    static void *p[N];
    for (int i = 0; i < N; i++)
        p[i] = xmalloc(24 + (size_t)(i * 53) % 3000);
    for (int i = 0; i < N; i += 2)
        free(p[i]);
    void *big = xmalloc(5 << 20);
    for (int i = 1; i < N; i += 10)
        p[i] = realloc(p[i], 5000);
    checkpoint("after");
    (void)old, (void)big;
}

/* ---- scenarios for the diagnosis ---- */

static size_t chunk(void *p) {
    /* glibc's chunk size (what mallinfo counts): usable size plus the size word. */
    return malloc_usable_size(p) + sizeof(size_t);
}

/* Allocate and keep: live data, not fragmentation. */
static void live(size_t mib) {
    size_t n = mib * 1024 * 1024 / 4000;
    for (size_t i = 0; i < n; i++)
        (void)xmalloc(4000);
    printf("live %zu rss %ld\n", n * 4000, rss_kib());
}

/* Many small blocks, all freed but the first that starts in each page: every page stays
 * resident for one block. Prints the heap's free bytes on those pages. */
static void pinned(size_t mib, int trim) {
    size_t n = mib * 1024 * 1024 / 200;
    void **p = malloc(n * sizeof *p);
    for (size_t i = 0; i < n; i++)
        p[i] = xmalloc(200);
    uintptr_t first = (uintptr_t)p[0] & ~4095UL, last_page = ~0UL;
    uintptr_t end = 0;
    size_t kept = 0, kept_bytes = 0;
    for (size_t i = 0; i < n; i++) {
        uintptr_t page = (uintptr_t)p[i] & ~4095UL;
        uintptr_t stop = (uintptr_t)p[i] + malloc_usable_size(p[i]);
        if (stop > end)
            end = stop;
        if (page != last_page) {
            last_page = page;
            kept++;
            kept_bytes += chunk(p[i]);
        } else {
            free(p[i]);
        }
    }
    size_t pages = ((end + 4095) & ~4095UL) - first;
    if (trim)
        malloc_trim(0);
    printf("pinned kept %zu retained %zu span %zu rss %ld\n", kept, pages - kept_bytes, pages,
           rss_kib());
    free(p);
}

/* A heap freed below one live block at its top: whole free pages in the middle, which
 * malloc_trim(0) gives back. */
static void trimmable(size_t mib, int trim) {
    size_t n = mib * 1024 * 1024 / 4000;
    void **p = malloc(n * sizeof *p);
    for (size_t i = 0; i < n; i++)
        p[i] = xmalloc(4000);
    void *pin = xmalloc(5000);
    for (size_t i = 0; i < n; i++)
        free(p[i]);
    free(p);
    if (trim)
        malloc_trim(0);
    printf("trimmable freed %zu rss %ld\n", n * 4000, rss_kib());
    (void)pin;
}

/* A free heap top that glibc keeps: freeing a large mmapped block raised the trim threshold
 * to twice its size, so the top freed later is not given back. */
static void top(size_t mib, int trim) {
    free(xmalloc(30 << 20));
    size_t n = mib * 1024 * 1024 / 4000;
    void **p = malloc(n * sizeof *p);
    for (size_t i = 0; i < n; i++)
        p[i] = xmalloc(4000);
    for (size_t i = n; i-- > 0;)
        free(p[i]);
    free(p);
    if (trim)
        malloc_trim(0);
    printf("top freed %zu rss %ld\n", n * 4000, rss_kib());
}

/* Threads, one after the other, each fill an arena of their own and free it all but a block
 * at its top: each arena keeps its free memory, which a shared arena would have reused. */
static pthread_mutex_t turn = PTHREAD_MUTEX_INITIALIZER;
static size_t arena_mib;
static pthread_barrier_t all_done;
static int finished;

static void *arena_worker(void *arg) {
    (void)arg;
    pthread_mutex_lock(&turn);
    size_t n = arena_mib * 1024 * 1024 / 1000;
    void **p = malloc(n * sizeof *p);
    for (size_t i = 0; i < n; i++)
        p[i] = xmalloc(1000);
    void *pin = xmalloc(1000);
    for (size_t i = 0; i < n; i++)
        free(p[i]);
    free(p);
    finished++;
    pthread_mutex_unlock(&turn);
    pthread_barrier_wait(&all_done);
    (void)pin;
    return NULL;
}

static void arenas(int threads, size_t mib, int trim) {
    arena_mib = mib;
    pthread_t t[64];
    pthread_barrier_init(&all_done, NULL, (unsigned)threads + 1);
    for (int k = 0; k < threads && k < 64; k++)
        pthread_create(&t[k], NULL, arena_worker, NULL);
    /* Every thread is alive until all have run: each has had an arena of its own. */
    for (;;) {
        pthread_mutex_lock(&turn);
        int all = finished == threads;
        pthread_mutex_unlock(&turn);
        if (all)
            break;
        usleep(1000);
    }
    if (trim)
        malloc_trim(0);
    printf("arenas %d rss %ld\n", threads, rss_kib());
    fflush(stdout);
    pthread_barrier_wait(&all_done);
    for (int k = 0; k < threads; k++)
        pthread_join(t[k], NULL);
}

/* A heap that grows, then shrinks as its top is freed: glibc gives the top back with brk
 * each time it exceeds the trim threshold. */
static void grow_shrink(size_t mib) {
    size_t n = mib * 1024 * 1024 / 4000;
    void **p = malloc(n * sizeof *p);
    for (size_t i = 0; i < n; i++)
        p[i] = xmalloc(4000);
    long high = rss_kib();
    for (size_t i = n; i-- > 0;)
        free(p[i]);
    free(p);
    printf("grow_shrink high %ld rss %ld\n", high, rss_kib());
}

/* Any allocator (LD_PRELOAD): blocks of several sizes, some freed; prints what is held. */
static void hold(size_t mib) {
    size_t sizes[] = {24, 100, 700, 4000, 20000, 100000, 1000000};
    size_t total = mib * 1024 * 1024, held = 0, i = 0;
    while (held < total) {
        size_t s = sizes[i % 7];
        void *p = xmalloc(s);
        if (i % 3 == 0)
            free(p);
        else
            held += s;
        i++;
    }
    printf("hold %zu rss %ld\n", held, rss_kib());
}

/* Large blocks freed but for one in sixteen: jemalloc keeps the freed pages dirty until they
 * decay (dirty_decay_ms, 10 s by default). */
static void decay(size_t mib) {
    size_t n = mib * 16;
    void **p = malloc(n * sizeof *p);
    for (size_t i = 0; i < n; i++)
        p[i] = xmalloc(64 << 10);
    for (size_t i = 0; i < n; i++)
        if (i % 16)
            free(p[i]);
    usleep(200 * 1000);
    printf("decay kept %zu rss %ld\n", n / 16 * (64 << 10), rss_kib());
    fflush(stdout);
    (void)p;
}

int main(int argc, char **argv) {
    /* stdout's buffer now, not in the middle of a measurement. */
    printf("pid %d\n", getpid());
    fflush(stdout);
    const char *mode = argc > 1 ? argv[1] : "";
    size_t n = argc > 2 ? strtoul(argv[2], NULL, 10) : 64;
    int trim = argc > 3 && strcmp(argv[3], "trim") == 0;
    if (strcmp(mode, "checkpoints") == 0) {
        if (argc > 2)
            info_prefix = argv[2];
        checkpoints();
    } else if (strcmp(mode, "attach") == 0) {
        if (argc > 2)
            info_prefix = argv[2];
        attach();
    } else if (strcmp(mode, "live") == 0) {
        live(n);
    } else if (strcmp(mode, "pinned") == 0) {
        pinned(n, trim);
    } else if (strcmp(mode, "trimmable") == 0) {
        trimmable(n, trim);
    } else if (strcmp(mode, "top") == 0) {
        top(n, trim);
    } else if (strcmp(mode, "arenas") == 0) {
        arenas(argc > 3 ? atoi(argv[3]) : 4, n, argc > 4 && strcmp(argv[4], "trim") == 0);
    } else if (strcmp(mode, "grow_shrink") == 0) {
        grow_shrink(n);
    } else if (strcmp(mode, "hold") == 0) {
        hold(n);
    } else if (strcmp(mode, "decay") == 0) {
        decay(n);
    } else {
        fprintf(stderr, "usage: heap_workload checkpoints|attach PREFIX | live|pinned|trimmable|top MIB [trim] | grow_shrink MIB | arenas MIB THREADS [trim] | hold|decay MIB\n");
        return 2;
    }
    return 0;
}
