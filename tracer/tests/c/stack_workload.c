/* Memory asked for by named functions, for the stack tests (tracer/tests/stacks.rs), which
 * compile it with and without frame pointers. Lines marked LINE(name) are checked against
 * the file:line of the recorded call sites.
 *
 * Usage: workload [go-file]: with a go-file, waits until it exists before the work (so that
 * a test can attach, or delete the binary, first), and after it until the file is gone. */
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

static void wait_for(const char *path, int exists) {
    struct stat st;
    for (int i = 0; i < 3000 && (stat(path, &st) == 0) != exists; i++)
        usleep(10000);
}

__attribute__((noinline)) char *map_region(size_t len) {
    char *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0); /* LINE(map_region) */
    return p == MAP_FAILED ? NULL : p;
}

__attribute__((noinline)) void touch_region(char *p, size_t len) {
    for (size_t off = 0; off < len; off += 4096)
        p[off] = 1; /* LINE(touch_region) */
}

__attribute__((noinline)) char *grow_heap(void) {
    char *v = malloc(100000); /* LINE(grow_heap) */
    if (v)
        memset(v, 1, 100000);
    return v;
}

int main(int argc, char **argv) {
    if (argc > 1)
        wait_for(argv[1], 1);
    for (int i = 0; i < 4; i++) {
        char *p = map_region(1 << 20);
        if (p)
            touch_region(p, 1 << 20);
        grow_heap();
    }
    if (argc > 1)
        wait_for(argv[1], 0);
    return 0;
}
