#include "hub/jarena.h"

#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <jansson.h>

#include "hub/log.h"
#include "hub/util.h"

#define ARENA_BYTES (512 * 1024)  /* a 64 KiB frame parses into ~300 KiB */
#define ALIGN       16

struct block {
	char *base;
	size_t live;                  /* allocations from it not yet freed */
	struct block *next;
};

static struct {
	struct block cur;
	struct block *abandoned;      /* blocks still holding live documents */
	size_t used;
	bool on;
} A;

size_t hub_jarena_abandoned;

static bool in_block(const struct block *b, const void *p)
{
	return b->base && (const char *)p >= b->base && (const char *)p < b->base + ARENA_BYTES;
}

static void *arena_malloc(size_t n)
{
	if (A.on) {
		size_t need = (n + ALIGN - 1) & ~(size_t)(ALIGN - 1);
		if (need <= ARENA_BYTES - A.used) {
			void *p = A.cur.base + A.used;
			A.used += need;
			A.cur.live++;
			return p;
		}
	}
	return malloc(n);
}

static void arena_free(void *p)
{
	if (in_block(&A.cur, p)) {
		A.cur.live--;
		return;
	}
	for (struct block **pp = &A.abandoned; *pp; pp = &(*pp)->next) {
		struct block *b = *pp;
		if (in_block(b, p)) {
			if (!--b->live) {
				*pp = b->next;
				free(b->base);
				free(b);
			}
			return;
		}
	}
	free(p);
}

void hub_jarena_install(void)
{
	json_set_alloc_funcs(arena_malloc, arena_free);
}

void hub_jarena_begin(void)
{
	if (A.cur.live) {
		/* Someone kept a document past its message: the block stays
		 * theirs until they free it; a new one serves from here on. */
		struct block *b = hub_xmalloc(sizeof(*b));
		*b = A.cur;
		b->next = A.abandoned;
		A.abandoned = b;
		A.cur.base = NULL;
		A.cur.live = 0;
		if (!hub_jarena_abandoned++)
			hub_warn("a JSON document outlived its message: arena block left to it");
	}
	if (!A.cur.base)
		A.cur.base = hub_xmalloc(ARENA_BYTES);
	A.used = 0;
	A.on = true;
}

void hub_jarena_end(void)
{
	A.on = false;
}
