/*
 * provenance.c - chained readings, signed checkpoints, device signatures and
 * their routes (hub/provenance.h; docs/provenance.md).
 *
 * The chain hash needs SHA-256, which Redis's Lua lacks, so the hub computes
 * it: each stream's head (position n and hash) is cached here; a frame is
 * stamped against the cache and store.lua stores it only if every reading
 * continues its stream's head as Redis holds it (compare-and-set inside the
 * atomic store call). Otherwise the script answers the stored heads, the
 * cache takes them and the frame is stamped and sent again. A duplicate
 * (seq in the window) is answered before the check, so it is never chained.
 */
#define _GNU_SOURCE
#include "hub/provenance.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <jansson.h>
#include <libwebsockets.h>
#include <openssl/evp.h>
#include <openssl/pem.h>

#include "hub/auth.h"
#include "hub/events.h"
#include "hub/hub.h"
#include "hub/http.h"
#include "hub/ingest.h"
#include "hub/keys.h"
#include "hub/log.h"
#include "hub/module.h"
#include "hub/strmap.h"
#include "hub_lua.h"

#define CACHE_MAX        (1u << 20)   /* cached heads; beyond, the cache starts over */
#define TRIES_MAX        16           /* stamps of one frame */
#define SIGKEY_TTL_US    (5 * 1000000) /* a device key is re-read after this */
#define TAKE_PAGE        1000         /* heads popped per call at a checkpoint */
#define CKPT_LIST_MAX    1000         /* checkpoints per answer */
#define CHAIN_PAGE_MAX   10000        /* entries per chain answer */
#define KEY_FILE         "provenance-key.pem"

struct head {
	int64_t n;
	uint8_t h[PROV_HASH_LEN];
};

struct sigkey {
	bool has, pending;
	int64_t fetched_us;
	uint8_t key[PROV_KEY_LEN];
};

struct hub_prov {
	struct hub *hub;
	bool on;
	uint8_t priv[32], pub[PROV_KEY_LEN];
	char pub_hex[2 * PROV_KEY_LEN + 1];
	hub_strmap heads;          /* stream key -> struct head */
	hub_strmap sigkeys;        /* device -> struct sigkey */
	int script_take, script_setkey;
	lws_sorted_usec_list_t sul_ckpt;
	int64_t last_period;
	bool job_running;
	uint64_t restamps, checkpoints;
};

static struct hub_prov *P(const struct hub *hub)
{
	return hub->prov;
}

bool hub_prov_on(const struct hub *hub)
{
	return hub->prov && hub->prov->on;
}

void hub_prov_shard_keys(hub_buf *resp, unsigned shard)
{
	char k[HUB_KEY_MAX];

	hub_resp_arg(resp, k, hub_key_shard_(k, sizeof(k), HUB_KEY_PROV_HEADS, shard, NULL, ""));
	hub_resp_arg(resp, k, hub_key_shard_(k, sizeof(k), HUB_KEY_PROV_DIRTY, shard, NULL, ""));
}

/* ---- the head cache ---------------------------------------------------------- */

static void free_value(const char *key, void *value, void *arg)
{
	(void)key;
	(void)arg;
	free(value);
}

static struct head *head_get(struct hub_prov *p, const char *key, size_t len)
{
	struct head *h = hub_strmap_get(&p->heads, key, len);

	if (h)
		return h;
	if (p->heads.count >= CACHE_MAX) {
		hub_strmap_foreach(&p->heads, free_value, NULL);
		hub_strmap_free(&p->heads);
		memset(&p->heads, 0, sizeof(p->heads));
	}
	h = hub_xcalloc(1, sizeof(*h)); /* unknown: assume a new chain (n 0) */
	hub_strmap_put(&p->heads, key, len, h);
	return h;
}

/* "<n> <hex>" (or "": no chain yet) into h; -1 if malformed. */
static int head_parse(const char *s, size_t len, struct head *h)
{
	const char *sp = memchr(s, ' ', len);
	int64_t n;

	if (!len) {
		memset(h, 0, sizeof(*h));
		return 0;
	}
	if (!sp || hub_parse_i64(s, (size_t)(sp - s), 1, INT64_MAX, &n) ||
	    hub_unhex(sp + 1, len - (size_t)(sp - s) - 1, h->h, PROV_HASH_LEN))
		return -1;
	h->n = n;
	return 0;
}

/* ---- stamping and the store ---------------------------------------------------- */

struct pframe {
	struct hub *hub;
	hub_redis_cb cb;
	void *arg;
	char *gateway;
	int64_t seq, at;
	size_t n, ng, lines_len;
	unsigned tries;
	struct hub_store_reading *r;
	struct hub_prov_stamp *ps;
	struct hub_store_group *g;
	char **keys;               /* each reading's stream key */
	char *lines;
	char *end;                 /* the copy's strings go up to here */
};

/* Copies n bytes (and a NUL) into the frame's one allocation at *at. */
static const char *put(char **at, const char *s, size_t n)
{
	char *d = *at;

	if (n)
		memcpy(d, s, n);
	d[n] = '\0';
	*at = d + n + 1;
	return d;
}

static void pframe_free(struct pframe *f)
{
	free(f); /* one allocation: the struct, its arrays and its strings */
}

static char *dupn(const char *s, size_t n)
{
	char *d = hub_xmalloc(n + 1);

	if (n)
		memcpy(d, s, n);
	d[n] = '\0';
	return d;
}

static void stamp(struct hub_prov *p, struct pframe *f)
{
	for (size_t i = 0; i < f->n; i++) {
		struct head *h = head_get(p, f->keys[i], strlen(f->keys[i]));
		struct hub_prov_stamp *s = &f->ps[i];
		const struct hub_store_reading *r = &f->r[i];
		struct prov_reading pr = {
			r->device, strlen(r->device), r->ts, r->ts_len, r->data, r->data_len,
			f->gateway, strlen(f->gateway), f->seq, f->at, h->n + 1,
			r->sig ? r->sig : "", r->sig ? r->sig_len : 0,
		};
		uint8_t out[PROV_HASH_LEN];

		s->at = f->at;
		s->n = h->n + 1;
		prov_hex(h->h, PROV_HASH_LEN, s->ph);
		prov_chain_hash(h->h, &pr, out);
		prov_hex(out, PROV_HASH_LEN, s->h);
		h->n = s->n;
		memcpy(h->h, out, PROV_HASH_LEN);
	}
}

/* The frame was not stored: heads still showing its stamps go back. */
static void unstamp(struct hub_prov *p, struct pframe *f)
{
	for (size_t i = f->n; i-- > 0;) {
		struct head *h = hub_strmap_get(&p->heads, f->keys[i], strlen(f->keys[i]));
		uint8_t mine[PROV_HASH_LEN];

		if (!h || h->n != f->ps[i].n || hub_unhex(f->ps[i].h, PROV_HEX_LEN, mine,
							   PROV_HASH_LEN) ||
		    memcmp(mine, h->h, PROV_HASH_LEN))
			continue;
		h->n = f->ps[i].n - 1;
		hub_unhex(f->ps[i].ph, PROV_HEX_LEN, h->h, PROV_HASH_LEN);
	}
}

static int pframe_send(struct pframe *f);

static void on_pstored(redisReply *reply, void *arg)
{
	struct pframe *f = arg;
	struct hub_prov *p = P(f->hub);

	if (!p) { /* shutting down */
		f->cb(reply, f->arg);
		pframe_free(f);
		return;
	}
	if (reply && reply->type == REDIS_REPLY_ARRAY && reply->elements >= 1 &&
	    reply->element[0]->type == REDIS_REPLY_INTEGER && reply->element[0]->integer == 2) {
		/* another hub moved a head: take the stored heads, stamp again */
		for (size_t i = 1; i + 1 < reply->elements; i += 2) {
			const redisReply *k = reply->element[i], *v = reply->element[i + 1];
			struct head h;

			if (k->type != REDIS_REPLY_STRING || v->type != REDIS_REPLY_STRING ||
			    head_parse(v->str, v->len, &h))
				continue;
			*head_get(p, k->str, k->len) = h;
		}
		p->restamps++;
		if (++f->tries < TRIES_MAX) {
			stamp(p, f);
			if (!pframe_send(f))
				return;
			unstamp(p, f);
		} else {
			hub_warn("provenance: gateway %s seq %" PRId64 ": chain heads kept moving "
				 "(%u stamps): answered unavailable", f->gateway, f->seq, f->tries);
		}
		f->cb(NULL, f->arg);
		pframe_free(f);
		return;
	}
	if (!reply || reply->type != REDIS_REPLY_ARRAY || reply->elements < 2)
		unstamp(p, f); /* a duplicate, an error or Redis gone: nothing chained */
	f->cb(reply, f->arg);
	pframe_free(f);
}

static int pframe_send(struct pframe *f)
{
	return hub_ingest_enqueue(f->hub, f->gateway, f->seq, f->r, f->ps, f->n, f->lines,
				  f->lines_len, f->g, f->ng, on_pstored, f);
}

int hub_prov_store_frame(struct hub *hub, const char *gateway, int64_t seq,
			 const struct hub_store_reading *r, size_t n,
			 const char *lines, size_t lines_len,
			 const struct hub_store_group *g, size_t ng,
			 hub_redis_cb cb, void *arg)
{
	struct hub_prov *p = P(hub);
	unsigned shards = hub_ingest_shards(hub), k;
	struct pframe *f;

	if (!shards || !hub_redis_up(hub->redis))
		return -1;
	k = hub_ingest_shard_of(gateway, shards);
	/* one allocation: the struct, its arrays, then every string */
	size_t glen = strlen(gateway), need = sizeof(*f) + n * (sizeof(*f->r) + sizeof(*f->ps) +
								sizeof(*f->keys)) +
					   ng * sizeof(*f->g) + glen + 1 + lines_len + 1;
	for (size_t i = 0; i < n; i++)
		need += 2 * strlen(r[i].device) + r[i].ts_len + r[i].data_len +
			(r[i].sig ? r[i].sig_len : 0) + (r[i].anom ? r[i].anom_len : 0) + 24 + 6;
	for (size_t i = 0; i < ng; i++)
		need += strlen(g[i].type) + 1;
	f = hub_xmalloc(need);
	memset(f, 0, sizeof(*f));
	f->r = (struct hub_store_reading *)(f + 1);
	f->ps = (struct hub_prov_stamp *)(f->r + n);
	f->keys = (char **)(f->ps + n);
	f->g = (struct hub_store_group *)(f->keys + n);
	char *at = (char *)(f->g + ng);
	f->hub = hub;
	f->cb = cb;
	f->arg = arg;
	f->gateway = (char *)put(&at, gateway, glen);
	f->seq = seq;
	f->at = hub_now_ms();
	f->n = n;
	f->ng = ng;
	for (size_t i = 0; i < n; i++) {
		size_t dl = strlen(r[i].device);
		f->r[i].device = put(&at, r[i].device, dl);
		f->r[i].ts = put(&at, r[i].ts, r[i].ts_len);
		f->r[i].ts_len = r[i].ts_len;
		f->r[i].data = put(&at, r[i].data, r[i].data_len);
		f->r[i].data_len = r[i].data_len;
		f->r[i].sig = NULL;
		f->r[i].sig_len = 0;
		if (r[i].sig) {
			f->r[i].sig = put(&at, r[i].sig, r[i].sig_len);
			f->r[i].sig_len = r[i].sig_len;
		}
		f->r[i].anom = NULL; /* anomaly flags (docs/anomalies.md): not chained */
		f->r[i].anom_len = 0;
		if (r[i].anom) {
			f->r[i].anom = put(&at, r[i].anom, r[i].anom_len);
			f->r[i].anom_len = r[i].anom_len;
		}
		f->keys[i] = at;
		at += hub_key_tm_shard(at, dl + 24, k, r[i].device) + 1;
	}
	for (size_t i = 0; i < ng; i++) {
		f->g[i] = g[i];
		f->g[i].type = put(&at, g[i].type, strlen(g[i].type));
	}
	f->lines = (char *)put(&at, lines, lines_len);
	f->lines_len = lines_len;
	f->end = at;
	stamp(p, f);
	if (pframe_send(f)) {
		unstamp(p, f);
		pframe_free(f);
		return -1;
	}
	return 0;
}

/* ---- device signatures ---------------------------------------------------------- */

bool hub_prov_type_signed(const schema_type *t)
{
	const json_t *doc = t ? schema_type_json(t) : NULL;

	return doc && json_is_true(json_object_get(doc, "signed_readings"));
}

struct sk_op {
	struct hub *hub;
	char device[HUB_ID_MAX + 1];
};

static void on_sigkey(redisReply *reply, void *arg)
{
	struct sk_op *op = arg;
	struct hub_prov *p = P(op->hub);
	struct sigkey *k = p ? hub_strmap_get(&p->sigkeys, op->device, strlen(op->device)) : NULL;

	if (k) {
		k->pending = false;
		if (reply && reply->type == REDIS_REPLY_NIL) {
			k->has = false;
			k->fetched_us = hub_mono_us();
		} else if (reply && reply->type == REDIS_REPLY_STRING) {
			k->has = !hub_unhex(reply->str, reply->len, k->key, PROV_KEY_LEN);
			k->fetched_us = hub_mono_us();
		} /* else: fetched_us stays; asked again next time */
	}
	free(op);
}

/* The cached entry of device, asking Redis when it is missing or old. */
static struct sigkey *sigkey_of(struct hub *hub, const char *device, size_t dl)
{
	struct hub_prov *p = P(hub);
	struct sigkey *k = hub_strmap_get(&p->sigkeys, device, dl);
	int64_t now = hub_mono_us();
	char hk[HUB_KEY_MAX];

	if (!k) {
		if (p->sigkeys.count >= CACHE_MAX) {
			hub_strmap_foreach(&p->sigkeys, free_value, NULL);
			hub_strmap_free(&p->sigkeys);
			memset(&p->sigkeys, 0, sizeof(p->sigkeys));
		}
		k = hub_xcalloc(1, sizeof(*k));
		hub_strmap_put(&p->sigkeys, device, dl, k);
	}
	if (k->pending || (k->fetched_us && now - k->fetched_us < SIGKEY_TTL_US))
		return k;
	struct sk_op *op = hub_xcalloc(1, sizeof(*op));
	op->hub = hub;
	memcpy(op->device, device, dl < HUB_ID_MAX ? dl : HUB_ID_MAX);
	hub_key_dev(hk, sizeof(hk), op->device);
	const char *argv[] = { "HGET", hk, "sigkey" };
	if (hub_redis_command_argv(hub->redis, on_sigkey, op, 3, argv, NULL)) {
		free(op);
		return k;
	}
	k->pending = true;
	return k;
}

void hub_prov_warm(struct hub *hub, const char *device)
{
	if (hub->prov)
		sigkey_of(hub, device, strlen(device));
}

enum hub_prov_sig hub_prov_check_sig(struct hub *hub, const char *device, size_t dl,
				     const char *ts, size_t tl, const char *data, size_t datal,
				     const char *sig, size_t sl, const char **why)
{
	struct sigkey *k = sigkey_of(hub, device, dl);
	uint8_t s[PROV_SIG_LEN], msg[1024], *m = msg;
	size_t ml;
	bool ok;

	if (!k->fetched_us)
		return HUB_PROV_SIG_PENDING; /* never read yet */
	if (!k->has) {
		*why = "the device's type requires signed readings and no key is registered "
		       "for it (PUT /v1/devices/{device}/key)";
		return HUB_PROV_SIG_BAD;
	}
	if (!sig || hub_unhex(sig, sl, s, PROV_SIG_LEN)) {
		*why = "sig (128 hex digits: the Ed25519 signature of the reading) is required";
		return HUB_PROV_SIG_BAD;
	}
	ml = prov_reading_message(device, dl, ts, tl, data, datal, NULL, 0);
	if (ml > sizeof(msg))
		m = hub_xmalloc(ml);
	prov_reading_message(device, dl, ts, tl, data, datal, m, ml);
	ok = prov_ed25519_verify(k->key, m, ml, s);
	if (m != msg)
		free(m);
	if (!ok) {
		*why = "the signature does not verify with the device's registered key";
		return HUB_PROV_SIG_BAD;
	}
	return HUB_PROV_SIG_OK;
}

/* ---- checkpoints --------------------------------------------------------------- */

struct ckjob {
	struct hub *hub;
	int64_t period, from, to;
	unsigned shard, shards;
	struct prov_leaf *leaves;
	size_t nl, cap;
};

static void job_end(struct ckjob *j)
{
	if (j->hub->prov)
		j->hub->prov->job_running = false;
	for (size_t i = 0; i < j->nl; i++)
		free((char *)j->leaves[i].device);
	free(j->leaves);
	free(j);
}

static void job_take(struct ckjob *j);

static void on_ckpt_added(redisReply *reply, void *arg)
{
	struct ckjob *j = arg;

	if (!reply || reply->type == REDIS_REPLY_ERROR)
		hub_err("provenance: checkpoint %" PRId64 " not stored: %s", j->period,
			reply ? reply->str : "Redis unavailable");
	else if (j->hub->prov)
		j->hub->prov->checkpoints++;
	job_end(j);
}

static void job_write(struct ckjob *j)
{
	struct hub *hub = j->hub;
	struct hub_prov *p = P(hub);
	uint8_t (*lh)[PROV_HASH_LEN], root[PROV_HASH_LEN], msg[256], sig[PROV_SIG_LEN];
	char root_hex[PROV_HEX_LEN + 1], sig_hex[2 * PROV_SIG_LEN + 1], hex[PROV_HEX_LEN + 1];
	char period[24], from[24], to[24], count[24], maxlen[24];
	hub_buf leaves = { 0 };
	size_t ml;

	if (!j->nl || !p) { /* nothing changed in the period: no checkpoint */
		job_end(j);
		return;
	}
	prov_leaves_sort(j->leaves, j->nl);
	lh = hub_xmalloc(j->nl * sizeof(*lh));
	for (size_t i = 0; i < j->nl; i++) {
		prov_leaf_hash(&j->leaves[i], lh[i]);
		prov_hex(j->leaves[i].head, PROV_HASH_LEN, hex);
		hub_buf_printf(&leaves, "%u\t%s\t%" PRId64 "\t%s\n", j->leaves[i].shard,
			       j->leaves[i].device, j->leaves[i].n, hex);
	}
	prov_merkle_root((const uint8_t (*)[PROV_HASH_LEN])lh, j->nl, root);
	free(lh);
	ml = prov_checkpoint_message(j->period, j->from, j->to, (int64_t)j->nl, root, msg,
				     sizeof(msg));
	if (prov_ed25519_sign(p->priv, msg, ml, sig)) {
		hub_err("provenance: signing checkpoint %" PRId64 " failed", j->period);
		hub_buf_free(&leaves);
		job_end(j);
		return;
	}
	prov_hex(root, PROV_HASH_LEN, root_hex);
	prov_hex(sig, PROV_SIG_LEN, sig_hex);
	snprintf(period, sizeof(period), "%" PRId64, j->period);
	snprintf(from, sizeof(from), "%" PRId64, j->from);
	snprintf(to, sizeof(to), "%" PRId64, j->to);
	snprintf(count, sizeof(count), "%zu", j->nl);
	snprintf(maxlen, sizeof(maxlen), "%ld", hub->cfg.provenance_checkpoints_max);
	const char *argv[] = { "XADD", HUB_KEY_PROV_CKPTS, "MAXLEN", "~", maxlen, "*",
			       "period", period, "from", from, "to", to, "count", count,
			       "root", root_hex, "sig", sig_hex, "key", p->pub_hex,
			       "leaves", leaves.data };
	size_t lens[sizeof(argv) / sizeof(argv[0])];
	for (size_t i = 0; i < sizeof(argv) / sizeof(argv[0]); i++)
		lens[i] = strlen(argv[i]);
	lens[sizeof(argv) / sizeof(argv[0]) - 1] = leaves.len;
	if (hub_redis_command_argv(hub->redis, on_ckpt_added, j,
				   (int)(sizeof(argv) / sizeof(argv[0])), argv, lens))
		job_end(j);
	hub_buf_free(&leaves);
}

/* "iot:tm:{i<k>}:<device>" -> shard and device; -1 if it is not one. */
static int parse_stream_key(const char *s, size_t len, unsigned *shard, const char **dev)
{
	size_t pl = sizeof(HUB_KEY_TM_SHARD) - 1;
	const char *e;
	unsigned k = 0;

	if (len < pl + 5 || memcmp(s, HUB_KEY_TM_SHARD "{i", pl + 2))
		return -1;
	for (e = s + pl + 2; e < s + len && *e >= '0' && *e <= '9'; e++)
		k = k * 10 + (unsigned)(*e - '0');
	if (e + 2 > s + len || e[0] != '}' || e[1] != ':' || e == s + pl + 2)
		return -1;
	*shard = k;
	*dev = e + 2;
	return 0;
}

static void on_take(redisReply *reply, void *arg)
{
	struct ckjob *j = arg;

	if (!reply || reply->type != REDIS_REPLY_ARRAY) {
		hub_err("provenance: checkpoint %" PRId64 ": reading the heads failed: %s",
			j->period, reply && reply->type == REDIS_REPLY_ERROR ? reply->str
									   : "Redis unavailable");
		job_end(j);
		return;
	}
	for (size_t i = 0; i + 1 < reply->elements; i += 2) {
		const redisReply *k = reply->element[i], *v = reply->element[i + 1];
		struct head h;
		unsigned shard;
		const char *dev;

		if (k->type != REDIS_REPLY_STRING || v->type != REDIS_REPLY_STRING ||
		    head_parse(v->str, v->len, &h) || !h.n ||
		    parse_stream_key(k->str, k->len, &shard, &dev))
			continue;
		if (j->nl == j->cap) {
			j->cap = j->cap ? j->cap * 2 : 64;
			j->leaves = hub_xrealloc(j->leaves, j->cap * sizeof(*j->leaves));
		}
		j->leaves[j->nl].shard = shard;
		j->leaves[j->nl].device = dupn(dev, k->len - (size_t)(dev - k->str));
		j->leaves[j->nl].n = h.n;
		memcpy(j->leaves[j->nl].head, h.h, PROV_HASH_LEN);
		j->nl++;
	}
	if (reply->elements < 2 * TAKE_PAGE)
		j->shard++;
	job_take(j);
}

/* Pops the changed heads of each shard, a page at a time. */
static void job_take(struct ckjob *j)
{
	struct hub *hub = j->hub;
	hub_buf b = { 0 };
	char page[16];
	int rc;

	if (!hub->prov || hub->draining) {
		job_end(j);
		return;
	}
	if (j->shard >= j->shards) {
		job_write(j);
		return;
	}
	snprintf(page, sizeof(page), "%d", TAKE_PAGE);
	hub_resp_head(&b, 3 + 2 + 1);
	hub_resp_evalsha(&b, hub->redis, P(hub)->script_take, 2);
	hub_prov_shard_keys(&b, j->shard);
	hub_resp_str(&b, page);
	rc = hub_redis_command_formatted(hub->redis, on_take, j, b.data, b.len);
	hub_buf_free(&b);
	if (rc)
		job_end(j);
}

static void on_claim(redisReply *reply, void *arg)
{
	struct ckjob *j = arg;

	if (!reply || reply->type != REDIS_REPLY_STATUS) { /* nil: another hub has it */
		job_end(j);
		return;
	}
	if (j->hub->prov) { /* the key it signs with is listed before it is used */
		const char *argv[] = { "SADD", HUB_KEY_PROV_KEYS, j->hub->prov->pub_hex };
		hub_redis_command_argv(j->hub->redis, NULL, NULL, 3, argv, NULL);
	}
	job_take(j);
}

static void ckpt_tick(lws_sorted_usec_list_t *sul);

static void ckpt_schedule(struct hub_prov *p)
{
	int64_t per = (int64_t)p->hub->cfg.provenance_checkpoint_s * 1000, now = hub_now_ms();
	int64_t next = (now / per + 1) * per + 50; /* just after the period ends */

	lws_sul_schedule(p->hub->ctx, 0, &p->sul_ckpt, ckpt_tick, (next - now) * 1000);
}

static void ckpt_tick(lws_sorted_usec_list_t *sul)
{
	struct hub_prov *p = lws_container_of(sul, struct hub_prov, sul_ckpt);
	struct hub *hub = p->hub;
	int64_t per = (int64_t)hub->cfg.provenance_checkpoint_s * 1000;
	int64_t period = hub_now_ms() / per - 1; /* the one that just ended */
	unsigned shards = hub_ingest_shards(hub);
	char key[HUB_KEY_MAX], px[24];

	ckpt_schedule(p);
	if (!p->on || p->job_running || period <= p->last_period || !shards ||
	    !hub_redis_up(hub->redis))
		return;
	p->last_period = period;
	struct ckjob *j = hub_xcalloc(1, sizeof(*j));
	j->hub = hub;
	j->period = period;
	j->from = period * per;
	j->to = (period + 1) * per;
	j->shards = shards;
	snprintf(key, sizeof(key), HUB_KEY_PROV_CLAIM "%" PRId64, period);
	snprintf(px, sizeof(px), "%" PRId64, per * 10);
	const char *argv[] = { "SET", key, hub->instance_id, "NX", "PX", px };
	if (hub_redis_command_argv(hub->redis, on_claim, j, 6, argv, NULL)) {
		free(j);
		return;
	}
	p->job_running = true;
}

/* ---- the hub's key --------------------------------------------------------------- */

static int key_load(const char *path, uint8_t priv[32], char *err, size_t errlen)
{
	FILE *f = fopen(path, "r");
	EVP_PKEY *k;
	size_t l = 32;
	int rc = -1;

	if (!f) {
		snprintf(err, errlen, "provenance-key %s: %s", path, strerror(errno));
		return -1;
	}
	k = PEM_read_PrivateKey(f, NULL, NULL, NULL);
	fclose(f);
	if (!k || EVP_PKEY_get_id(k) != EVP_PKEY_ED25519 ||
	    EVP_PKEY_get_raw_private_key(k, priv, &l) != 1 || l != 32)
		snprintf(err, errlen, "provenance-key %s: not an Ed25519 private key in PEM "
			 "(openssl genpkey -algorithm ed25519)", path);
	else
		rc = 0;
	EVP_PKEY_free(k);
	return rc;
}

/* A new key written to path (0600, never over an existing file). */
static int key_create(const char *path, uint8_t priv[32])
{
	uint8_t pub[PROV_KEY_LEN];
	EVP_PKEY *k;
	FILE *f;
	int fd, rc = -1;

	if (prov_ed25519_generate(priv, pub))
		return -1;
	if (!(k = EVP_PKEY_new_raw_private_key(EVP_PKEY_ED25519, NULL, priv, 32)))
		return -1;
	fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
	if (fd >= 0 && (f = fdopen(fd, "w"))) {
		rc = PEM_write_PrivateKey(f, k, NULL, NULL, 0, NULL, NULL) == 1 ? 0 : -1;
		if (fclose(f))
			rc = -1;
	} else if (fd >= 0) {
		close(fd);
	}
	EVP_PKEY_free(k);
	return rc;
}

static int key_setup(struct hub_prov *p, char *err, size_t errlen)
{
	const struct hub_config *cfg = &p->hub->cfg;
	char path[4096];

	if (cfg->provenance_key && *cfg->provenance_key) {
		if (key_load(cfg->provenance_key, p->priv, err, errlen))
			return -1;
	} else if (cfg->redis_embedded && cfg->data_dir) {
		snprintf(path, sizeof(path), "%s/" KEY_FILE, cfg->data_dir);
		if (access(path, F_OK) == 0) {
			if (key_load(path, p->priv, err, errlen))
				return -1;
		} else if (key_create(path, p->priv)) {
			snprintf(err, errlen, "provenance: cannot write a new key to %s: %s", path,
				 strerror(errno));
			return -1;
		} else {
			hub_info("provenance: new checkpoint key %s", path);
		}
	} else {
		uint8_t pub[PROV_KEY_LEN];
		if (prov_ed25519_generate(p->priv, pub)) {
			snprintf(err, errlen, "provenance: generating a key failed");
			return -1;
		}
		hub_warn("provenance: no provenance-key: checkpoints are signed with a key made "
			 "for this run (set provenance-key to keep one across restarts)");
	}
	if (prov_ed25519_public(p->priv, p->pub)) {
		snprintf(err, errlen, "provenance: deriving the public key failed");
		return -1;
	}
	prov_hex(p->pub, PROV_KEY_LEN, p->pub_hex);
	return 0;
}

static void on_redis_ready(struct hub *hub, enum hub_event ev, const void *payload, void *arg)
{
	struct hub_prov *p = arg;
	const char *argv[] = { "SADD", HUB_KEY_PROV_KEYS, p->pub_hex };

	(void)ev;
	(void)payload;
	hub_redis_command_argv(hub->redis, NULL, NULL, 3, argv, NULL);
}

/* ---- routes ------------------------------------------------------------------------ */

static int qint(struct hub_req *rq, const struct hub_query *q, const char *name, int64_t min,
		int64_t max, int64_t def, int64_t *out)
{
	const char *v = hub_query_get(q, name);
	char msg[96];

	*out = def;
	if (!v)
		return 0;
	if (hub_parse_i64(v, strlen(v), min, max, out)) {
		snprintf(msg, sizeof(msg), "%s must be an integer from %" PRId64 " to %" PRId64,
			 name, min, max);
		hub_req_error(rq, 422, "invalid", name, msg);
		return -1;
	}
	return 0;
}

static void failed(struct hub_req *rq, redisReply *r)
{
	if (r && r->type == REDIS_REPLY_ERROR)
		hub_err("provenance: Redis: %s", r->str);
	hub_req_unavailable(rq);
}

static int cmd(struct hub_req *rq, hub_redis_cb cb, int argc, const char **argv,
	       const size_t *lens)
{
	hub_req_ref(rq);
	if (hub_redis_command_argv(hub_req_hub(rq)->redis, cb, rq, argc, argv, lens)) {
		hub_req_unref(rq);
		hub_req_unavailable(rq);
		return -1;
	}
	return 0;
}

static const redisReply *field(const redisReply *kv, const char *name)
{
	if (!kv || kv->type != REDIS_REPLY_ARRAY)
		return NULL;
	for (size_t i = 0; i + 1 < kv->elements; i += 2)
		if (kv->element[i]->type == REDIS_REPLY_STRING && !strcmp(kv->element[i]->str, name))
			return kv->element[i + 1];
	return NULL;
}

static void put_str(hub_buf *b, const char *name, const redisReply *v)
{
	hub_buf_printf(b, "\"%s\":", name);
	if (v && v->type == REDIS_REPLY_STRING)
		hub_buf_json_str(b, v->str, v->len);
	else
		hub_buf_puts(b, "null");
}

static void put_num(hub_buf *b, const char *name, const redisReply *v)
{
	int64_t x;

	hub_buf_printf(b, "\"%s\":", name);
	if (v && v->type == REDIS_REPLY_STRING && !hub_parse_i64(v->str, v->len, INT64_MIN / 2,
								 INT64_MAX / 2, &x))
		hub_buf_i64(b, x);
	else
		hub_buf_puts(b, "null");
}

/* GET /v1/provenance/key */
static void on_keys(redisReply *r, void *arg)
{
	struct hub_req *rq = arg;
	struct hub_prov *p = P(hub_req_hub(rq));
	hub_buf b = { 0 };

	if (hub_req_gone(rq))
		goto out;
	if (!r || r->type != REDIS_REPLY_ARRAY || !p) {
		failed(rq, r);
		goto out;
	}
	hub_buf_printf(&b, "{\"algorithm\":\"Ed25519\",\"key\":\"%s\",\"keys\":[\"%s\"",
		       p->pub_hex, p->pub_hex);
	for (size_t i = 0; i < r->elements; i++) {
		if (r->element[i]->type != REDIS_REPLY_STRING || !strcmp(r->element[i]->str, p->pub_hex))
			continue;
		hub_buf_puts(&b, ",");
		hub_buf_json_str(&b, r->element[i]->str, r->element[i]->len);
	}
	hub_buf_puts(&b, "]}");
	hub_req_respond(rq, 200, "application/json", b.data, b.len);
	hub_buf_free(&b);
out:
	hub_req_unref(rq);
}

static void route_key(struct hub_req *rq, const struct hub_route_args *a)
{
	const char *argv[] = { "SMEMBERS", HUB_KEY_PROV_KEYS };

	(void)a;
	cmd(rq, on_keys, 2, argv, NULL);
}

/* GET /v1/provenance/checkpoints?from&to[&device][&limit] */
struct ck_ctx {
	char device[HUB_ID_MAX + 1];
	bool hidden;    /* outside the key's patterns: answered as having no leaves */
};

/* True if the request's API key may see device (its `devices` patterns). A
 * device it may not see is answered exactly like one that does not exist. */
static bool visible(struct hub_req *rq, const char *device)
{
	return auth_patterns_match(&hub_req_who(rq)->devices, device);
}

static void ck_device_leaves(hub_buf *b, const redisReply *leaves, const char *device)
{
	size_t n = 0, cap = 0, mine = 0;
	struct prov_leaf *l = NULL;
	char *text, *line, *save = NULL;

	hub_buf_puts(b, ",\"leaves\":[");
	if (!leaves || leaves->type != REDIS_REPLY_STRING) {
		hub_buf_puts(b, "]");
		return;
	}
	text = dupn(leaves->str, leaves->len);
	for (line = strtok_r(text, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
		char *f[4], *s2 = NULL;
		int nf = 0;
		for (char *t = strtok_r(line, "\t", &s2); t && nf < 4; t = strtok_r(NULL, "\t", &s2))
			f[nf++] = t;
		if (nf != 4)
			continue;
		if (n == cap) {
			cap = cap ? cap * 2 : 64;
			l = hub_xrealloc(l, cap * sizeof(*l));
		}
		l[n].shard = (unsigned)strtoul(f[0], NULL, 10);
		l[n].device = f[1];
		l[n].n = strtoll(f[2], NULL, 10);
		if (hub_unhex(f[3], strlen(f[3]), l[n].head, PROV_HASH_LEN))
			continue;
		n++;
	}
	/* the leaves are stored sorted: their order is the tree's */
	uint8_t (*lh)[PROV_HASH_LEN] = hub_xmalloc((n ? n : 1) * sizeof(*lh));
	for (size_t i = 0; i < n; i++)
		prov_leaf_hash(&l[i], lh[i]);
	for (size_t i = 0; i < n; i++) {
		uint8_t path[64][PROV_HASH_LEN];
		char hex[PROV_HEX_LEN + 1];
		size_t np;

		if (strcmp(l[i].device, device))
			continue;
		np = prov_merkle_path((const uint8_t (*)[PROV_HASH_LEN])lh, n, i, path, 64);
		prov_hex(l[i].head, PROV_HASH_LEN, hex);
		hub_buf_printf(b, "%s{\"shard\":%u,\"n\":%" PRId64 ",\"head\":\"%s\",\"index\":%zu,"
			       "\"path\":[", mine++ ? "," : "", l[i].shard, l[i].n, hex, i);
		for (size_t k = 0; k < np; k++) {
			prov_hex(path[k], PROV_HASH_LEN, hex);
			hub_buf_printf(b, "%s\"%s\"", k ? "," : "", hex);
		}
		hub_buf_puts(b, "]}");
	}
	hub_buf_puts(b, "]");
	free(lh);
	free(l);
	free(text);
}

static void on_ckpts(redisReply *r, void *arg)
{
	struct hub_req *rq = arg;
	struct ck_ctx *c = hub_req_ctx(rq);
	hub_buf b = { 0 };

	if (hub_req_gone(rq))
		goto out;
	if (!r || r->type != REDIS_REPLY_ARRAY) {
		failed(rq, r);
		goto out;
	}
	hub_buf_puts(&b, "{\"checkpoints\":[");
	for (size_t i = 0; i < r->elements; i++) {
		const redisReply *e = r->element[i], *kv;
		if (e->type != REDIS_REPLY_ARRAY || e->elements != 2)
			continue;
		kv = e->element[1];
		hub_buf_puts(&b, i ? ",{" : "{");
		put_str(&b, "id", e->element[0]);
		hub_buf_puts(&b, ",");
		put_num(&b, "period", field(kv, "period"));
		hub_buf_puts(&b, ",");
		put_num(&b, "from", field(kv, "from"));
		hub_buf_puts(&b, ",");
		put_num(&b, "to", field(kv, "to"));
		hub_buf_puts(&b, ",");
		put_num(&b, "count", field(kv, "count"));
		hub_buf_puts(&b, ",");
		put_str(&b, "root", field(kv, "root"));
		hub_buf_puts(&b, ",");
		put_str(&b, "sig", field(kv, "sig"));
		hub_buf_puts(&b, ",");
		put_str(&b, "key", field(kv, "key"));
		if (c->device[0])
			ck_device_leaves(&b, c->hidden ? NULL : field(kv, "leaves"), c->device);
		hub_buf_puts(&b, "}");
	}
	hub_buf_puts(&b, "]}");
	hub_req_respond(rq, 200, "application/json", b.data, b.len);
	hub_buf_free(&b);
out:
	hub_req_unref(rq);
}

static void route_checkpoints(struct hub_req *rq, const struct hub_route_args *a)
{
	struct ck_ctx *c = hub_xcalloc(1, sizeof(*c));
	int64_t from, to, limit;
	const char *dev = hub_query_get(a->query, "device");
	char s[24], e[24], l[24];

	hub_req_set_ctx(rq, c, free);
	if (qint(rq, a->query, "from", 0, INT64_MAX / 2, 0, &from) ||
	    qint(rq, a->query, "to", 0, INT64_MAX / 2, INT64_MAX / 2, &to) ||
	    qint(rq, a->query, "limit", 1, CKPT_LIST_MAX, CKPT_LIST_MAX, &limit))
		return;
	if (to < from) {
		hub_req_error(rq, 422, "invalid", "to", "to must not be before from");
		return;
	}
	if (dev) {
		if (!hub_id_valid(dev, strlen(dev))) {
			hub_req_error(rq, 422, "invalid", "device", "not a device id");
			return;
		}
		snprintf(c->device, sizeof(c->device), "%s", dev);
		c->hidden = !visible(rq, dev);
	}
	snprintf(s, sizeof(s), "%" PRId64, from);
	snprintf(e, sizeof(e), "%" PRId64, to);
	snprintf(l, sizeof(l), "%" PRId64, limit);
	const char *argv[] = { "XRANGE", HUB_KEY_PROV_CKPTS, s, e, "COUNT", l };
	cmd(rq, on_ckpts, 6, argv, NULL);
}

/* GET /v1/provenance/chain/{device}?shard&from&to[&after][&limit]: the
 * stream's entries as stored (the verifier's input) and its stored head.
 * The page is read from Redis CHAIN_BATCH entries at a time, each batch
 * once the client has taken the one before (streamed, chunked): a page of
 * 10,000 entries costs the hub one batch per client, however slowly the
 * client reads, never the whole page (12 MB and more) held for it. */
#define CHAIN_BATCH 256

struct chain_ctx {
	char *head, *sigkey;
	unsigned waiting;       /* answers before the first batch can go */
	bool failed;
	unsigned shard, shards;
	int64_t left;           /* entries still to send */
	size_t sent;            /* entries sent */
	bool done;              /* no batch to read any more */
	char *next;             /* the page's `next`, NULL: none */
	hub_buf batch;          /* the batch read ahead of the answer's start */
	char key[HUB_KEY_MAX];  /* the stream */
	char start[48], end[24];/* the next XRANGE's bounds */
	char device[HUB_ID_MAX + 1];
};

static void chain_ctx_free(void *v)
{
	struct chain_ctx *c = v;

	hub_buf_free(&c->batch);
	free(c->next);
	free(c->head);
	free(c->sigkey);
	free(c);
}

static void on_chain_range(redisReply *r, void *arg);

/* Asks for the next batch: at most `left` entries, plus one to see
 * whether the stream goes on past the page. */
static int chain_ask(struct hub_req *rq, struct chain_ctx *c)
{
	char cnt[24];
	int64_t n = c->left < CHAIN_BATCH ? c->left : CHAIN_BATCH;

	snprintf(cnt, sizeof(cnt), "%" PRId64, n + 1);
	const char *argv[] = { "XRANGE", c->key, c->start, c->end, "COUNT", cnt };
	return cmd(rq, on_chain_range, 6, argv, NULL);
}

/* One XRANGE answer as JSON objects appended to b; moves the cursor on and
 * decides whether the page is done (and its `next`). */
static void chain_render(struct chain_ctx *c, const redisReply *r, hub_buf *b)
{
	static const char *const names[] = { "ts", "data", "gw", "seq", "at", "n", "ph", "sig" };
	int64_t want = c->left < CHAIN_BATCH ? c->left : CHAIN_BATCH;
	size_t n = r->elements < (size_t)want ? r->elements : (size_t)want;
	const redisReply *last = NULL;

	for (size_t i = 0; i < n; i++) {
		const redisReply *e = r->element[i], *kv;
		if (e->type != REDIS_REPLY_ARRAY || e->elements != 2 ||
		    e->element[0]->type != REDIS_REPLY_STRING)
			continue;
		kv = e->element[1];
		hub_buf_puts(b, c->sent++ ? ",{" : "{");
		put_str(b, "id", e->element[0]);
		for (size_t k = 0; k < sizeof(names) / sizeof(names[0]); k++) {
			hub_buf_puts(b, ",");
			put_str(b, names[k], field(kv, names[k]));
		}
		hub_buf_puts(b, "}");
		last = e->element[0];
	}
	c->left -= (int64_t)n;
	if (r->elements <= n || !last) {
		c->done = true;         /* the stream ends within the page */
	} else if (!c->left) {
		c->done = true;         /* the page is full; the stream goes on */
		c->next = dupn(last->str, last->len);
	} else {
		snprintf(c->start, sizeof(c->start), "(%.*s", (int)last->len, last->str);
	}
}

static void chain_end(struct hub_req *rq, struct chain_ctx *c)
{
	hub_buf b = { 0 };

	hub_buf_puts(&b, "],\"next\":");
	if (c->next)
		hub_buf_json_str(&b, c->next, strlen(c->next));
	else
		hub_buf_puts(&b, "null");
	hub_buf_puts(&b, "}");
	hub_req_stream_write(rq, b.data, b.len);
	hub_req_stream_end(rq);
	hub_buf_free(&b);
}

/* The client has taken everything queued: the next batch, or the end. */
static void chain_drained(struct hub_req *rq)
{
	struct chain_ctx *c = hub_req_ctx(rq);

	if (c->done) {
		chain_end(rq, c);
		return;
	}
	if (chain_ask(rq, c))
		hub_req_abort(rq); /* the answer has started: cut it (not valid JSON) */
}

static void chain_begin(struct hub_req *rq, struct chain_ctx *c)
{
	hub_buf b = { 0 };

	hub_buf_puts(&b, "{\"device\":");
	hub_buf_json_str(&b, c->device, strlen(c->device));
	hub_buf_printf(&b, ",\"shard\":%u,\"shards\":%u,\"head\":", c->shard, c->shards);
	if (c->head)
		hub_buf_json_str(&b, c->head, strlen(c->head));
	else
		hub_buf_puts(&b, "null");
	hub_buf_puts(&b, ",\"sigkey\":");
	if (c->sigkey)
		hub_buf_json_str(&b, c->sigkey, strlen(c->sigkey));
	else
		hub_buf_puts(&b, "null");
	hub_buf_puts(&b, ",\"entries\":[");
	hub_buf_append(&b, c->batch.data ? c->batch.data : "", c->batch.len);
	hub_buf_free(&c->batch);
	hub_req_stream_begin(rq, 200, "application/json", chain_drained);
	hub_req_stream_write(rq, b.data, b.len);
	hub_buf_free(&b);
}

static void chain_maybe_begin(struct hub_req *rq, struct chain_ctx *c)
{
	if (c->waiting || hub_req_gone(rq))
		return;
	if (c->failed)
		hub_req_unavailable(rq);
	else
		chain_begin(rq, c);
}

/* A GET of the chain's head or signing key: the string (nil: none) into *slot. */
static void chain_take_string(redisReply *r, struct hub_req *rq, char **slot)
{
	struct chain_ctx *c = hub_req_ctx(rq);

	c->waiting--;
	if (!r || r->type == REDIS_REPLY_ERROR)
		c->failed = true;
	else if (r->type == REDIS_REPLY_STRING)
		*slot = dupn(r->str, r->len);
	chain_maybe_begin(rq, c);
	hub_req_unref(rq);
}

static void on_chain_head(redisReply *r, void *arg)
{
	struct chain_ctx *c = hub_req_ctx(arg);

	chain_take_string(r, arg, &c->head);
}

static void on_chain_sigkey(redisReply *r, void *arg)
{
	struct chain_ctx *c = hub_req_ctx(arg);

	chain_take_string(r, arg, &c->sigkey);
}

/* A batch: the first one waits for the head and the key (chain_begin sends
 * it with them); a later one goes out as the next chunk. */
static void on_chain_range(redisReply *r, void *arg)
{
	struct hub_req *rq = arg;
	struct chain_ctx *c = hub_req_ctx(rq);
	bool first = c->waiting > 0;
	hub_buf b = { 0 };

	if (first)
		c->waiting--;
	if (hub_req_gone(rq))
		goto out;
	if (!r || r->type != REDIS_REPLY_ARRAY) {
		if (r && r->type == REDIS_REPLY_ERROR)
			hub_err("provenance: Redis: %s", r->str);
		if (!first) {
			hub_req_abort(rq); /* mid-answer: cut it */
			goto out;
		}
		c->failed = true;
	} else if (first) {
		chain_render(c, r, &c->batch);
	} else {
		chain_render(c, r, &b);
		hub_req_stream_write(rq, b.data, b.len); /* drained asks for more */
	}
	if (first)
		chain_maybe_begin(rq, c);
out:
	hub_buf_free(&b);
	hub_req_unref(rq);
}

static void route_chain(struct hub_req *rq, const struct hub_route_args *a)
{
	struct hub *hub = hub_req_hub(rq);
	const char *device = a->param[0], *after = hub_query_get(a->query, "after");
	struct chain_ctx *c;
	int64_t shard, from, to, limit;
	char hk[HUB_KEY_MAX], dk[HUB_KEY_MAX];
	unsigned shards = hub_ingest_shards(hub);

	if (!hub_id_valid(device, strlen(device)) || !visible(rq, device)) {
		hub_req_error(rq, 404, "not_found", NULL, "no such device");
		return;
	}
	if (!shards) {
		hub_req_unavailable(rq);
		return;
	}
	c = hub_xcalloc(1, sizeof(*c));
	hub_req_set_ctx(rq, c, chain_ctx_free);
	if (qint(rq, a->query, "shard", 0, shards - 1, 0, &shard) ||
	    qint(rq, a->query, "from", 0, INT64_MAX / 2, 0, &from) ||
	    qint(rq, a->query, "to", 0, INT64_MAX / 2, INT64_MAX / 2, &to) ||
	    qint(rq, a->query, "limit", 1, CHAIN_PAGE_MAX, 1000, &limit))
		return;
	if (to < from) {
		hub_req_error(rq, 422, "invalid", "to", "to must not be before from");
		return;
	}
	snprintf(c->device, sizeof(c->device), "%s", device);
	c->shard = (unsigned)shard;
	c->shards = shards;
	c->left = limit;
	if (after) {
		uint64_t ms, sq;
		if (hub_parse_pos(after, strlen(after), true, &ms, &sq)) {
			hub_req_error(rq, 422, "invalid", "after", "after must be an entry id (<ms>-<n>)");
			return;
		}
		snprintf(c->start, sizeof(c->start), "(%" PRIu64 "-%" PRIu64, ms, sq);
	} else {
		snprintf(c->start, sizeof(c->start), "%" PRId64, from);
	}
	snprintf(c->end, sizeof(c->end), "%" PRId64, to);
	hub_key_tm_shard(c->key, sizeof(c->key), c->shard, device);
	hub_key_shard_(hk, sizeof(hk), HUB_KEY_PROV_HEADS, c->shard, NULL, "");
	hub_key_dev(dk, sizeof(dk), device);
	const char *a1[] = { "HGET", hk, c->key };
	const char *a3[] = { "HGET", dk, "sigkey" };
	/* three answers; a refused one counts as failed (cmd answered 503) */
	c->waiting = 3;
	if (cmd(rq, on_chain_head, 3, a1, NULL) || chain_ask(rq, c) ||
	    cmd(rq, on_chain_sigkey, 3, a3, NULL)) {
		c->failed = true;
		c->waiting = 100; /* answered already: never again */
	}
}

/* PUT /v1/devices/{device}/key {"key": "<64 hex>" | null} */
static void on_setkey(redisReply *r, void *arg)
{
	struct hub_req *rq = arg;

	if (hub_req_gone(rq))
		goto out;
	if (!r || r->type != REDIS_REPLY_INTEGER)
		failed(rq, r);
	else if (!r->integer)
		hub_req_error(rq, 404, "not_found", NULL, "no such device");
	else
		hub_req_respond(rq, 204, "application/json", "", 0);
out:
	hub_req_unref(rq);
}

static void route_setkey(struct hub_req *rq, const struct hub_route_args *a)
{
	struct hub *hub = hub_req_hub(rq);
	const char *device = a->param[0];
	json_error_t je;
	json_t *body, *k;
	uint8_t raw[PROV_KEY_LEN];
	char dk[HUB_KEY_MAX], hex[2 * PROV_KEY_LEN + 1] = "";
	hub_buf b = { 0 };

	if (!hub_id_valid(device, strlen(device)) || !visible(rq, device)) {
		hub_req_error(rq, 404, "not_found", NULL, "no such device");
		return;
	}
	body = json_loadb(a->body, a->body_len, JSON_REJECT_DUPLICATES, &je);
	k = body ? json_object_get(body, "key") : NULL;
	if (!json_is_object(body) || !k || (!json_is_null(k) && (!json_is_string(k) ||
	    hub_unhex(json_string_value(k), json_string_length(k), raw, PROV_KEY_LEN)))) {
		json_decref(body);
		hub_req_error(rq, 422, "invalid", "key",
			      "key must be the device's Ed25519 public key as 64 hex digits, or null");
		return;
	}
	if (json_is_string(k))
		prov_hex(raw, PROV_KEY_LEN, hex);
	json_decref(body);
	hub_key_dev(dk, sizeof(dk), device);
	hub_resp_head(&b, 3 + 1 + 1);
	hub_resp_evalsha(&b, hub->redis, P(hub)->script_setkey, 1);
	hub_resp_str(&b, dk);
	hub_resp_str(&b, hex);
	hub_req_ref(rq);
	if (hub_redis_command_formatted(hub->redis, on_setkey, rq, b.data, b.len)) {
		hub_req_unref(rq);
		hub_req_unavailable(rq);
	}
	hub_buf_free(&b);
	/* this hub reads it again at once; others within SIGKEY_TTL_US */
	free(hub_strmap_del(&P(hub)->sigkeys, device, strlen(device)));
}

static const struct hub_route routes[] = {
	{ "GET", "/v1/provenance/key", HUB_ROUTE_KEY, AUTH_SCOPE_TELEMETRY_READ, route_key },
	{ "GET", "/v1/provenance/checkpoints", HUB_ROUTE_KEY, AUTH_SCOPE_TELEMETRY_READ,
	  route_checkpoints },
	{ "GET", "/v1/provenance/chain/{}", HUB_ROUTE_KEY, AUTH_SCOPE_TELEMETRY_READ, route_chain },
	{ "PUT", "/v1/devices/{}/key", HUB_ROUTE_KEY, AUTH_SCOPE_ADMIN, route_setkey },
};

/* ---- the module ---------------------------------------------------------------------- */

static int prov_start(struct hub *hub, char *err, size_t errlen)
{
	struct hub_prov *p = hub_xcalloc(1, sizeof(*p));

	p->hub = hub;
	p->on = hub->cfg.provenance != 0;
	p->last_period = -1;
	hub->prov = p;
	if (key_setup(p, err, errlen))
		return -1;
	p->script_take = hub_redis_add_script(hub->redis, hub_lua_prov_take);
	p->script_setkey = hub_redis_add_script(hub->redis, hub_lua_prov_setkey);
	hub_http_add_routes(hub, routes, sizeof(routes) / sizeof(routes[0]), NULL);
	hub_observe(hub, HUB_EV_REDIS_READY, on_redis_ready, p);
	if (p->on)
		ckpt_schedule(p);
	hub_info("provenance: %s; checkpoints every %d s, key %s", p->on ? "on" : "off",
		 hub->cfg.provenance_checkpoint_s, p->pub_hex);
	return 0;
}

static void prov_stop(struct hub *hub)
{
	if (hub->prov)
		lws_sul_cancel(&hub->prov->sul_ckpt);
}

static void prov_free(struct hub *hub)
{
	struct hub_prov *p = hub->prov;

	if (!p)
		return;
	hub_strmap_foreach(&p->heads, free_value, NULL);
	hub_strmap_free(&p->heads);
	hub_strmap_foreach(&p->sigkeys, free_value, NULL);
	hub_strmap_free(&p->sigkeys);
	OPENSSL_cleanse(p->priv, sizeof(p->priv));
	free(p);
	hub->prov = NULL;
}

const struct hub_module hub_prov_module = {
	.name = "provenance",
	.start = prov_start,
	.stop = prov_stop,
	.free = prov_free,
};
