/*
 * strmap.h - a small chained hash map from string keys to pointers. Keys are
 * copied; values are borrowed. Grows by doubling; never shrinks below 8.
 */
#ifndef HUB_STRMAP_H
#define HUB_STRMAP_H

#include <stddef.h>
#include <stdint.h>

struct hub_strmap_node;

typedef struct hub_strmap {
	struct hub_strmap_node **buckets;
	size_t nbuckets;
	size_t count;
} hub_strmap;

/* Returns the value stored for key[0..len), or NULL. */
void *hub_strmap_get(const hub_strmap *m, const char *key, size_t len);

/* Stores value under key (replacing; returns the previous value or NULL). */
void *hub_strmap_put(hub_strmap *m, const char *key, size_t len, void *value);

/* Removes key; returns its value or NULL. */
void *hub_strmap_del(hub_strmap *m, const char *key, size_t len);

/* Calls fn for every entry; fn must not modify the map. */
void hub_strmap_foreach(const hub_strmap *m,
			void (*fn)(const char *key, void *value, void *arg), void *arg);

/* Frees the map's own memory (not the values). */
void hub_strmap_free(hub_strmap *m);

uint64_t hub_hash(const char *s, size_t len);

#endif
