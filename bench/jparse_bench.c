/*
 * jparse_bench.c - instructions per telemetry frame, jparse vs json_loadb.
 * Not built by CMake; by hand:
 *   gcc -O2 -I. bench/jparse_bench.c protocols/jparse.c -ljansson -o /tmp/jpb
 *   valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.out /tmp/jpb 10000
 *   callgrind_annotate --inclusive=yes /tmp/cg.out | grep -E 'jparse|json_loadb|json_delete'
 * A frame is 100 readings like the gateways send; each parser parses it
 * N times and releases each tree (json_delete's share is the decref).
 * Arguments: N, then "jparse" or "loadb" for one parser alone, then
 * "arena" to allocate from a reset bump block as the hub does (hub/jarena.c)
 * instead of malloc.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "protocols/jparse.h"

static size_t frame(char *b, size_t cap)
{
	size_t n = 0;
	int i;

	n += (size_t)snprintf(b + n, cap - n,
			      "{\"type\":\"telemetry\",\"seq\":123456,\"readings\":[");
	for (i = 0; i < 100; i++)
		n += (size_t)snprintf(b + n, cap - n,
				      "%s{\"device\":\"gw-0001-d%03d\",\"ts\":%lld,"
				      "\"data\":{\"temperature\":%d.%02d,\"humidity\":%d.%02d}}",
				      i ? "," : "", i, 1700000000000LL + i * 10,
				      15 + i % 15, (i * 37) % 100, 30 + i % 40,
				      (i * 53) % 100);
	n += (size_t)snprintf(b + n, cap - n, "]}");
	return n;
}

static char arena[1 << 20] __attribute__((aligned(16)));
static size_t arena_used;

static void *arena_malloc(size_t n)
{
	void *p = arena + arena_used;

	arena_used += (n + 15) & ~(size_t)15;
	if (arena_used > sizeof(arena))
		abort();
	return p;
}

static void arena_free(void *p)
{
	(void)p;
}

static __attribute__((noinline)) json_t *run_loadb(const char *b, size_t n)
{
	return json_loadb(b, n, JSON_REJECT_DUPLICATES, NULL);
}

static __attribute__((noinline)) json_t *run_jparse(const char *b, size_t n)
{
	return jparse(b, n, NULL);
}

int main(int argc, char **argv)
{
	static char b[65536];
	size_t n = frame(b, sizeof(b));
	long i, iters = argc > 1 ? atol(argv[1]) : 10000;
	int use_arena = argc > 3 && !strcmp(argv[3], "arena");
	json_t *x, *y;

	x = run_loadb(b, n);
	y = run_jparse(b, n);
	if (!x || !y || !json_equal(x, y)) {
		fprintf(stderr, "mismatch\n");
		return 1;
	}
	json_decref(x);
	json_decref(y);
	printf("frame: %zu bytes\n", n);
	if (use_arena)
		json_set_alloc_funcs(arena_malloc, arena_free);
	/* "jparse" or "loadb" alone, for a profile of one of them. */
	if (argc < 3 || strcmp(argv[2], "jparse") != 0)
		for (i = 0; i < iters; i++) {
			json_decref(run_loadb(b, n));
			arena_used = 0;
		}
	if (argc < 3 || strcmp(argv[2], "loadb") != 0)
		for (i = 0; i < iters; i++) {
			json_decref(run_jparse(b, n));
			arena_used = 0;
		}
	return 0;
}
