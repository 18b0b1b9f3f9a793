#include "hub/strmap.h"

#include <stdlib.h>
#include <string.h>

#include "hub/util.h"

struct hub_strmap_node {
	struct hub_strmap_node *next;
	void *value;
	uint64_t hash;
	size_t len;
	char key[];
};

uint64_t hub_hash(const char *s, size_t len)
{
	/* FNV-1a, 64-bit. */
	uint64_t h = 1469598103934665603ull;

	for (size_t i = 0; i < len; i++) {
		h ^= (unsigned char)s[i];
		h *= 1099511628211ull;
	}
	return h;
}

static struct hub_strmap_node **find(const hub_strmap *m, const char *key,
				     size_t len, uint64_t h)
{
	struct hub_strmap_node **pp = &m->buckets[h & (m->nbuckets - 1)];

	for (; *pp; pp = &(*pp)->next)
		if ((*pp)->hash == h && (*pp)->len == len && !memcmp((*pp)->key, key, len))
			return pp;
	return pp;
}

void *hub_strmap_get(const hub_strmap *m, const char *key, size_t len)
{
	if (!m->count)
		return NULL;
	struct hub_strmap_node *n = *find(m, key, len, hub_hash(key, len));
	return n ? n->value : NULL;
}

static void grow(hub_strmap *m)
{
	size_t nb = m->nbuckets ? m->nbuckets * 2 : 8;
	struct hub_strmap_node **b = hub_xcalloc(nb, sizeof(*b));

	for (size_t i = 0; i < m->nbuckets; i++) {
		struct hub_strmap_node *n = m->buckets[i], *next;
		for (; n; n = next) {
			next = n->next;
			n->next = b[n->hash & (nb - 1)];
			b[n->hash & (nb - 1)] = n;
		}
	}
	free(m->buckets);
	m->buckets = b;
	m->nbuckets = nb;
}

void *hub_strmap_put(hub_strmap *m, const char *key, size_t len, void *value)
{
	uint64_t h = hub_hash(key, len);

	if (m->count + 1 > m->nbuckets)
		grow(m);
	struct hub_strmap_node **pp = find(m, key, len, h);
	if (*pp) {
		void *old = (*pp)->value;
		(*pp)->value = value;
		return old;
	}
	struct hub_strmap_node *n = hub_xmalloc(sizeof(*n) + len + 1);
	n->next = NULL;
	n->value = value;
	n->hash = h;
	n->len = len;
	memcpy(n->key, key, len);
	n->key[len] = '\0';
	*pp = n;
	m->count++;
	return NULL;
}

void *hub_strmap_del(hub_strmap *m, const char *key, size_t len)
{
	if (!m->count)
		return NULL;
	struct hub_strmap_node **pp = find(m, key, len, hub_hash(key, len));
	struct hub_strmap_node *n = *pp;
	if (!n)
		return NULL;
	void *v = n->value;
	*pp = n->next;
	free(n);
	m->count--;
	return v;
}

void hub_strmap_foreach(const hub_strmap *m,
			void (*fn)(const char *key, void *value, void *arg), void *arg)
{
	for (size_t i = 0; i < m->nbuckets; i++)
		for (struct hub_strmap_node *n = m->buckets[i]; n; n = n->next)
			fn(n->key, n->value, arg);
}

void hub_strmap_free(hub_strmap *m)
{
	for (size_t i = 0; i < m->nbuckets; i++) {
		struct hub_strmap_node *n = m->buckets[i], *next;
		for (; n; n = next) {
			next = n->next;
			free(n);
		}
	}
	free(m->buckets);
	memset(m, 0, sizeof(*m));
}
