// C++ allocations for vmatrace's --heap tests (tracer/tests/heap.rs compiles this with g++,
// without frame pointers): every block comes from `new`, whose code is libstdc++'s
// `operator new`, so the call site vmatrace names must be found past it, in this file.
// A first megabyte, then a stop (SIGSTOP, until the test sees vmatrace has handled those
// calls): vmatrace learns of the wrapper from the first calls (the kernel copies stack words
// only for calls returning into a wrapper it was told of). Then, with `churn N`, N rounds of
// `new` + `delete` in a tight loop: every call's words must find its entry.
#include <signal.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

struct Record {
    char payload[4000];
};

// Keeps `mib` MiB of records alive: the call site of the live bytes.
static std::vector<Record *> keep_records(size_t mib) {
    std::vector<Record *> kept;
    kept.reserve(mib * 256);
    for (size_t i = 0; i < mib * 256; i++) {
        Record *r = new Record;
        memset(r->payload, 1, sizeof r->payload);
        kept.push_back(r);
    }
    return kept;
}

struct Small {
    char bytes[48];
};

// Allocates and frees a small block `rounds` times, as fast as `new` goes.
static void churn_blocks(size_t rounds) {
    for (size_t i = 0; i < rounds; i++) {
        Small *s = new Small;
        asm volatile("" : : "r"(s) : "memory");
        delete s;
    }
}

int main(int argc, char **argv) {
    size_t mib = argc > 1 ? strtoul(argv[1], nullptr, 10) : 32;
    printf("pid %d\n", (int)getpid());
    std::vector<Record *> first = keep_records(1);
    printf("checkpoint warm\n");
    fflush(stdout);
    raise(SIGSTOP);
    std::vector<Record *> kept = keep_records(mib);
    if (argc > 3 && strcmp(argv[2], "churn") == 0) churn_blocks(strtoul(argv[3], nullptr, 10));
    printf("live %zu\n", (first.size() + kept.size()) * sizeof(Record));
    fflush(stdout);
    return kept.empty() ? 1 : 0;
}
