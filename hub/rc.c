/*
 * rc.c - a blocking Redis client, one Redis or a cluster (rc.h).
 */
#include "hub/rc.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>

#include "hub/slot.h"

#define SEEDS_MAX   16
#define NODES_MAX   64
#define HOST_MAX    256
#define REDIRECTS   5

struct node {
	char host[HOST_MAX];
	int port;
	redisContext *c;
};

struct rc {
	struct node seeds[SEEDS_MAX];
	int nseeds;
	struct node nodes[NODES_MAX];
	int nnodes;
	short slot_node[HUB_SLOTS];   /* index into nodes, -1: unknown */
	bool cluster, known;
	int db;
	char *password;            /* NULL: none */
	int timeout_ms;
	char err[256];
};

static void set_err(struct rc *rc, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void set_err(struct rc *rc, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(rc->err, sizeof(rc->err), fmt, ap);
	va_end(ap);
}

const char *rc_error(const struct rc *rc)
{
	return rc->err;
}

bool rc_is_cluster(const struct rc *rc)
{
	return rc->cluster;
}

/* redis://[:PASSWORD@]HOST:PORT[/DB] -> one seed. */
static int parse_url(struct rc *rc, const char *u, size_t n, struct node *out)
{
	char buf[512], *p, *at, *colon, *slash;

	if (n < 8 || strncmp(u, "redis://", 8) || n - 8 >= sizeof(buf))
		return -1;
	memcpy(buf, u + 8, n - 8);
	buf[n - 8] = '\0';
	p = buf;
	if ((at = strrchr(p, '@'))) {
		*at = '\0';
		free(rc->password);
		rc->password = strdup(*p == ':' ? p + 1 : p);
		if (!rc->password)
			abort();
		p = at + 1;
	}
	if ((slash = strchr(p, '/'))) {
		*slash = '\0';
		if (slash[1])
			rc->db = atoi(slash + 1);
	}
	colon = strrchr(p, ':');
	if (!colon || colon == p || strlen(p) >= HOST_MAX)
		return -1;
	*colon = '\0';
	out->port = atoi(colon + 1);
	if (out->port <= 0 || out->port > 65535)
		return -1;
	snprintf(out->host, HOST_MAX, "%.255s", p);
	return 0;
}

struct rc *rc_new(const char *url, int timeout_ms, char *err, size_t errlen)
{
	struct rc *rc = calloc(1, sizeof(*rc));
	const char *p = url;

	if (!rc)
		abort();
	rc->timeout_ms = timeout_ms;
	while (*p) {
		const char *e = strchr(p, ',');
		size_t n = e ? (size_t)(e - p) : strlen(p);
		if (rc->nseeds == SEEDS_MAX || parse_url(rc, p, n, &rc->seeds[rc->nseeds])) {
			snprintf(err, errlen, "redis: expected redis://HOST:PORT[/DB] or comma-separated "
				 "cluster seed URLs (at most %d), not \"%s\"", SEEDS_MAX, url);
			free(rc->password);
			free(rc);
			return NULL;
		}
		rc->nseeds++;
		p = e ? e + 1 : p + n;
	}
	if (!rc->nseeds) {
		snprintf(err, errlen, "redis: no URL given");
		free(rc->password);
		free(rc);
		return NULL;
	}
	for (int i = 0; i < HUB_SLOTS; i++)
		rc->slot_node[i] = -1;
	return rc;
}

struct rc *rc_new_seeds(const char *const *hosts, const int *ports, int n,
			const char *password, int db, int timeout_ms)
{
	struct rc *rc;

	if (n <= 0 || n > SEEDS_MAX)
		return NULL;
	if (!(rc = calloc(1, sizeof(*rc))))
		abort();
	rc->timeout_ms = timeout_ms;
	rc->db = db;
	if (password && !(rc->password = strdup(password)))
		abort();
	for (int i = 0; i < n; i++) {
		snprintf(rc->seeds[i].host, HOST_MAX, "%s", hosts[i]);
		rc->seeds[i].port = ports[i];
	}
	rc->nseeds = n;
	for (int i = 0; i < HUB_SLOTS; i++)
		rc->slot_node[i] = -1;
	return rc;
}

static void node_close(struct node *n)
{
	if (n->c)
		redisFree(n->c);
	n->c = NULL;
}

void rc_free(struct rc *rc)
{
	if (!rc)
		return;
	for (int i = 0; i < rc->nseeds; i++)
		node_close(&rc->seeds[i]);
	for (int i = 0; i < rc->nnodes; i++)
		node_close(&rc->nodes[i]);
	free(rc->password);
	free(rc);
}

/* Connects n if it is not; 0 or -1 (err set). */
static int node_open(struct rc *rc, struct node *n)
{
	struct timeval tv = { rc->timeout_ms / 1000, (rc->timeout_ms % 1000) * 1000 };
	redisReply *r;

	if (n->c)
		return 0;
	n->c = redisConnectWithTimeout(n->host, n->port, tv);
	if (!n->c || n->c->err) {
		set_err(rc, "%s:%d: %s", n->host, n->port, n->c ? n->c->errstr : "out of memory");
		node_close(n);
		return -1;
	}
	redisSetTimeout(n->c, tv);
	if (rc->password && rc->password[0]) {
		r = redisCommand(n->c, "AUTH %s", rc->password);
		if (!r || r->type == REDIS_REPLY_ERROR) {
			set_err(rc, "%s:%d: AUTH: %s", n->host, n->port, r ? r->str : n->c->errstr);
			if (r)
				freeReplyObject(r);
			node_close(n);
			return -1;
		}
		freeReplyObject(r);
	}
	if (rc->db && !rc->cluster) {
		r = redisCommand(n->c, "SELECT %d", rc->db);
		if (!r || r->type == REDIS_REPLY_ERROR) {
			set_err(rc, "%s:%d: SELECT: %s", n->host, n->port, r ? r->str : n->c->errstr);
			if (r)
				freeReplyObject(r);
			node_close(n);
			return -1;
		}
		freeReplyObject(r);
	}
	return 0;
}

static int node_find(struct rc *rc, const char *host, int port)
{
	for (int i = 0; i < rc->nnodes; i++)
		if (rc->nodes[i].port == port && !strcmp(rc->nodes[i].host, host))
			return i;
	if (rc->nnodes == NODES_MAX)
		return -1;
	snprintf(rc->nodes[rc->nnodes].host, HOST_MAX, "%s", host);
	rc->nodes[rc->nnodes].port = port;
	rc->nodes[rc->nnodes].c = NULL;
	return rc->nnodes++;
}

/* The slot map from CLUSTER SLOTS of c (asked at host). */
static int map_read(struct rc *rc, redisContext *c, const char *host)
{
	redisReply *r = redisCommand(c, "CLUSTER SLOTS");

	if (!r || r->type != REDIS_REPLY_ARRAY) {
		set_err(rc, "CLUSTER SLOTS: %s", r && r->type == REDIS_REPLY_ERROR ? r->str : c->errstr);
		if (r)
			freeReplyObject(r);
		return -1;
	}
	for (int i = 0; i < HUB_SLOTS; i++)
		rc->slot_node[i] = -1;
	for (size_t i = 0; i < r->elements; i++) {
		redisReply *e = r->element[i];
		if (e->type != REDIS_REPLY_ARRAY || e->elements < 3 ||
		    e->element[2]->type != REDIS_REPLY_ARRAY || e->element[2]->elements < 2)
			continue;
		redisReply *h = e->element[2]->element[0], *p = e->element[2]->element[1];
		const char *nh = h->type == REDIS_REPLY_STRING && h->len ? h->str : host;
		int idx = node_find(rc, nh, (int)p->integer);
		if (idx < 0)
			continue;
		for (long long s = e->element[0]->integer; s <= e->element[1]->integer && s < HUB_SLOTS; s++)
			rc->slot_node[s] = (short)idx;
	}
	freeReplyObject(r);
	return 0;
}

int rc_connect(struct rc *rc)
{
	for (int i = 0; i < rc->nseeds; i++) {
		struct node *s = &rc->seeds[i];
		redisReply *r;

		if (node_open(rc, s))
			continue;
		r = redisCommand(s->c, "INFO cluster");
		if (!r || r->type != REDIS_REPLY_STRING) {
			set_err(rc, "%s:%d: INFO: %s", s->host, s->port,
				r && r->type == REDIS_REPLY_ERROR ? r->str : s->c->errstr);
			if (r)
				freeReplyObject(r);
			node_close(s);
			continue;
		}
		rc->cluster = strstr(r->str, "cluster_enabled:1") != NULL;
		freeReplyObject(r);
		if (rc->cluster && map_read(rc, s->c, s->host)) {
			node_close(s);
			continue;
		}
		rc->known = true;
		return 0;
	}
	return -1;
}

static redisContext *ctx_for(struct rc *rc, const char *key)
{
	struct node *n;

	if (!rc->known && rc_connect(rc))
		return NULL;
	if (!rc->cluster) {
		for (int i = 0; i < rc->nseeds; i++)
			if (!node_open(rc, &rc->seeds[i]))
				return rc->seeds[i].c;
		return NULL;
	}
	int idx = key ? rc->slot_node[hub_slot(key, strlen(key))] : 0;
	if (idx < 0 || idx >= rc->nnodes) {
		rc->known = false;
		if (rc_connect(rc))
			return NULL;
		idx = key ? rc->slot_node[hub_slot(key, strlen(key))] : 0;
		if (idx < 0 || idx >= rc->nnodes) {
			set_err(rc, "no node serves the slot of %s", key ? key : "(any)");
			return NULL;
		}
	}
	n = &rc->nodes[idx];
	return node_open(rc, n) ? NULL : n->c;
}

/* The node holding c, to drop it after an I/O error. */
static void ctx_drop(struct rc *rc, redisContext *c)
{
	for (int i = 0; i < rc->nseeds; i++)
		if (rc->seeds[i].c == c)
			node_close(&rc->seeds[i]);
	for (int i = 0; i < rc->nnodes; i++)
		if (rc->nodes[i].c == c)
			node_close(&rc->nodes[i]);
	if (rc->cluster)
		rc->known = false; /* the map may have changed too */
}

redisReply *rc_cmd(struct rc *rc, const char *key, int argc, const char **argv,
		   const size_t *argvlen)
{
	bool asking = false;
	int ask_idx = -1;

	for (int hop = 0; hop <= REDIRECTS; hop++) {
		redisContext *c;
		redisReply *r;

		if (ask_idx >= 0) {
			c = node_open(rc, &rc->nodes[ask_idx]) ? NULL : rc->nodes[ask_idx].c;
		} else {
			c = ctx_for(rc, key);
		}
		if (!c)
			return NULL;
		if (asking) {
			r = redisCommand(c, "ASKING");
			if (r)
				freeReplyObject(r);
		}
		r = redisCommandArgv(c, argc, argv, argvlen);
		if (!r) {
			set_err(rc, "%s", c->errstr[0] ? c->errstr : "connection lost");
			ctx_drop(rc, c);
			return NULL;
		}
		if (r->type == REDIS_REPLY_ERROR && rc->cluster) {
			char host[HOST_MAX];
			int slot, port, kind = hub_parse_redirect(r->str, r->len, &slot, host,
								  sizeof(host), &port);
			if (kind) {
				freeReplyObject(r);
				if (!host[0])
					snprintf(host, sizeof(host), "127.0.0.1");
				int idx = node_find(rc, host, port);
				if (idx < 0) {
					set_err(rc, "too many cluster nodes");
					return NULL;
				}
				if (kind == 1) {
					rc->slot_node[slot] = (short)idx;
					rc->known = false; /* read the whole map again next time */
					rc_connect(rc);
					rc->slot_node[slot] = (short)idx;
					ask_idx = -1;
					asking = false;
				} else {
					ask_idx = idx;
					asking = true;
				}
				continue;
			}
		}
		return r;
	}
	set_err(rc, "too many redirections for %s", key ? key : "(no key)");
	return NULL;
}
