/*
 * prov_core.c - canonical encodings, chain hash, Merkle tree, Ed25519 and
 * the verifier's walk (prov_core.h; docs/provenance.md).
 */
#include "hub/prov_core.h"

#include <stdlib.h>
#include <string.h>
#include <stdio.h>
#include <openssl/evp.h>
#include <openssl/sha.h>

static const uint8_t ZERO[PROV_HASH_LEN];

/* ---- length-prefixed fields into a running SHA-256 --------------------- */

/* OpenSSL 3 deprecates the SHA256_* functions but keeps them; they are
 * several times cheaper per short message than an EVP_MD_CTX round. */
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"

static void put_len(uint8_t b[4], size_t n)
{
	b[0] = (uint8_t)(n >> 24);
	b[1] = (uint8_t)(n >> 16);
	b[2] = (uint8_t)(n >> 8);
	b[3] = (uint8_t)n;
}

static void sha_field(SHA256_CTX *s, const void *p, size_t n)
{
	uint8_t l[4];

	put_len(l, n);
	SHA256_Update(s, l, 4);
	if (n)
		SHA256_Update(s, p, n);
}

static void sha_int(SHA256_CTX *s, int64_t v)
{
	char b[24];
	int n = snprintf(b, sizeof(b), "%lld", (long long)v);

	sha_field(s, b, (size_t)n);
}


void prov_chain_hash(const uint8_t prev[PROV_HASH_LEN], const struct prov_reading *r,
		     uint8_t out[PROV_HASH_LEN])
{
	static const char dom[] = "iot-hub.prov.v1";
	SHA256_CTX s;

	SHA256_Init(&s);
	SHA256_Update(&s, dom, sizeof(dom)); /* with its NUL */
	sha_field(&s, prev, PROV_HASH_LEN);
	sha_int(&s, r->n);
	sha_field(&s, r->device, r->device_len);
	sha_field(&s, r->ts, r->ts_len);
	sha_field(&s, r->data, r->data_len);
	sha_field(&s, r->gw, r->gw_len);
	sha_int(&s, r->seq);
	sha_int(&s, r->at);
	sha_field(&s, r->sig, r->sig_len);
	SHA256_Final(out, &s);
}

void prov_leaf_hash(const struct prov_leaf *l, uint8_t out[PROV_HASH_LEN])
{
	SHA256_CTX s;
	uint8_t z = 0;

	SHA256_Init(&s);
	SHA256_Update(&s, &z, 1);
	sha_int(&s, l->shard);
	sha_field(&s, l->device, strlen(l->device));
	sha_int(&s, l->n);
	sha_field(&s, l->head, PROV_HASH_LEN);
	SHA256_Final(out, &s);
}

static void node_hash(const uint8_t *a, const uint8_t *b, uint8_t out[PROV_HASH_LEN])
{
	SHA256_CTX s;
	uint8_t one = 1;

	SHA256_Init(&s);
	SHA256_Update(&s, &one, 1);
	SHA256_Update(&s, a, PROV_HASH_LEN);
	SHA256_Update(&s, b, PROV_HASH_LEN);
	SHA256_Final(out, &s);
}

#pragma GCC diagnostic pop

/* ---- plain byte messages ----------------------------------------------- */

struct wbuf {
	uint8_t *p;
	size_t len, cap;
};

static void wput(struct wbuf *w, const void *p, size_t n)
{
	if (w->len + n <= w->cap && n)
		memcpy(w->p + w->len, p, n);
	w->len += n;
}

static void wfield(struct wbuf *w, const void *p, size_t n)
{
	uint8_t l[4];

	put_len(l, n);
	wput(w, l, 4);
	wput(w, p, n);
}

static void wint(struct wbuf *w, int64_t v)
{
	char b[24];
	int n = snprintf(b, sizeof(b), "%lld", (long long)v);

	wfield(w, b, (size_t)n);
}

size_t prov_reading_message(const char *device, size_t dl, const char *ts, size_t tl,
			    const char *data, size_t datal, uint8_t *out, size_t cap)
{
	static const char dom[] = "iot-hub.reading.v1";
	struct wbuf w = { out, 0, cap };

	wput(&w, dom, sizeof(dom));
	wfield(&w, device, dl);
	wfield(&w, ts, tl);
	wfield(&w, data, datal);
	return w.len;
}

size_t prov_checkpoint_message(int64_t period, int64_t from, int64_t to, int64_t count,
			       const uint8_t root[PROV_HASH_LEN], uint8_t *out, size_t cap)
{
	static const char dom[] = "iot-hub.checkpoint.v1";
	struct wbuf w = { out, 0, cap };

	wput(&w, dom, sizeof(dom));
	wint(&w, period);
	wint(&w, from);
	wint(&w, to);
	wint(&w, count);
	wfield(&w, root, PROV_HASH_LEN);
	return w.len;
}

/* ---- hex ------------------------------------------------------------------- */

void prov_hex(const uint8_t *in, size_t n, char *out)
{
	static const char d[] = "0123456789abcdef";

	for (size_t i = 0; i < n; i++) {
		out[2 * i] = d[in[i] >> 4];
		out[2 * i + 1] = d[in[i] & 15];
	}
	out[2 * n] = '\0';
}

/* ---- the Merkle tree ------------------------------------------------------- */

static int leaf_cmp(const void *a, const void *b)
{
	const struct prov_leaf *x = a, *y = b;
	int c = strcmp(x->device, y->device);

	if (c)
		return c;
	return x->shard < y->shard ? -1 : x->shard > y->shard;
}

void prov_leaves_sort(struct prov_leaf *l, size_t n)
{
	if (n > 1)
		qsort(l, n, sizeof(*l), leaf_cmp);
}

static size_t split_of(size_t n) /* the largest power of two < n (n >= 2) */
{
	size_t k = 1;

	while (k << 1 < n)
		k <<= 1;
	return k;
}

/* Recursion depth is log2(n): at most 64. */
static void mth(const uint8_t (*lh)[PROV_HASH_LEN], size_t n, uint8_t out[PROV_HASH_LEN])
{
	uint8_t l[PROV_HASH_LEN], r[PROV_HASH_LEN];
	size_t k;

	if (n == 1) {
		memcpy(out, lh[0], PROV_HASH_LEN);
		return;
	}
	k = split_of(n);
	mth(lh, k, l);
	mth(lh + k, n - k, r);
	node_hash(l, r, out);
}

void prov_merkle_root(const uint8_t (*lh)[PROV_HASH_LEN], size_t n, uint8_t out[PROV_HASH_LEN])
{
	if (!n) {
		SHA256(NULL, 0, out);
		return;
	}
	mth(lh, n, out);
}

size_t prov_merkle_path(const uint8_t (*lh)[PROV_HASH_LEN], size_t n, size_t i,
			uint8_t (*path)[PROV_HASH_LEN], size_t cap)
{
	size_t k, np;

	if (n <= 1 || i >= n)
		return 0;
	k = split_of(n);
	if (i < k) {
		np = prov_merkle_path(lh, k, i, path, cap);
		if (np < cap)
			mth(lh + k, n - k, path[np]);
	} else {
		np = prov_merkle_path(lh + k, n - k, i - k, path, cap);
		if (np < cap)
			mth(lh, k, path[np]);
	}
	return np + 1;
}

bool prov_merkle_check(const uint8_t lh[PROV_HASH_LEN], size_t i, size_t n,
		       const uint8_t (*path)[PROV_HASH_LEN], size_t npath,
		       const uint8_t root[PROV_HASH_LEN])
{
	/* RFC 9162 2.1.3.2 */
	uint8_t r[PROV_HASH_LEN];
	size_t fn = i, sn = n - 1;

	if (i >= n)
		return false;
	memcpy(r, lh, PROV_HASH_LEN);
	for (size_t p = 0; p < npath; p++) {
		if (!sn)
			return false;
		if ((fn & 1) || fn == sn) {
			node_hash(path[p], r, r);
			if (!(fn & 1))
				while (fn && !(fn & 1)) {
					fn >>= 1;
					sn >>= 1;
				}
		} else {
			node_hash(r, path[p], r);
		}
		fn >>= 1;
		sn >>= 1;
	}
	return sn == 0 && !memcmp(r, root, PROV_HASH_LEN);
}

/* ---- Ed25519 ----------------------------------------------------------------- */

bool prov_ed25519_verify(const uint8_t pub[PROV_KEY_LEN], const uint8_t *msg, size_t len,
			 const uint8_t sig[PROV_SIG_LEN])
{
	EVP_PKEY *k = EVP_PKEY_new_raw_public_key(EVP_PKEY_ED25519, NULL, pub, PROV_KEY_LEN);
	EVP_MD_CTX *m = NULL;
	bool ok = false;

	if (!k)
		return false;
	if (!(m = EVP_MD_CTX_new()))
		goto out;
	if (EVP_DigestVerifyInit(m, NULL, NULL, NULL, k) != 1)
		goto out;
	ok = EVP_DigestVerify(m, sig, PROV_SIG_LEN, msg, len) == 1;
out:
	EVP_MD_CTX_free(m);
	EVP_PKEY_free(k);
	return ok;
}

int prov_ed25519_sign(const uint8_t priv[32], const uint8_t *msg, size_t len,
		      uint8_t sig[PROV_SIG_LEN])
{
	EVP_PKEY *k = EVP_PKEY_new_raw_private_key(EVP_PKEY_ED25519, NULL, priv, 32);
	EVP_MD_CTX *m = NULL;
	size_t sl = PROV_SIG_LEN;
	int rc = -1;

	if (!k)
		return -1;
	if (!(m = EVP_MD_CTX_new()))
		goto out;
	if (EVP_DigestSignInit(m, NULL, NULL, NULL, k) != 1)
		goto out;
	if (EVP_DigestSign(m, sig, &sl, msg, len) == 1 && sl == PROV_SIG_LEN)
		rc = 0;
out:
	EVP_MD_CTX_free(m);
	EVP_PKEY_free(k);
	return rc;
}

int prov_ed25519_public(const uint8_t priv[32], uint8_t pub[PROV_KEY_LEN])
{
	EVP_PKEY *k = EVP_PKEY_new_raw_private_key(EVP_PKEY_ED25519, NULL, priv, 32);
	size_t pl = PROV_KEY_LEN;
	int rc = -1;

	if (!k)
		return -1;
	if (EVP_PKEY_get_raw_public_key(k, pub, &pl) == 1 && pl == PROV_KEY_LEN)
		rc = 0;
	EVP_PKEY_free(k);
	return rc;
}

int prov_ed25519_generate(uint8_t priv[32], uint8_t pub[PROV_KEY_LEN])
{
	EVP_PKEY_CTX *c = EVP_PKEY_CTX_new_id(EVP_PKEY_ED25519, NULL);
	EVP_PKEY *k = NULL;
	size_t l = 32;
	int rc = -1;

	if (!c)
		return -1;
	if (EVP_PKEY_keygen_init(c) != 1 || EVP_PKEY_keygen(c, &k) != 1)
		goto out;
	if (EVP_PKEY_get_raw_private_key(k, priv, &l) != 1 || l != 32)
		goto out;
	l = PROV_KEY_LEN;
	if (EVP_PKEY_get_raw_public_key(k, pub, &l) != 1 || l != PROV_KEY_LEN)
		goto out;
	rc = 0;
out:
	EVP_PKEY_free(k);
	EVP_PKEY_CTX_free(c);
	return rc;
}

/* ---- the walk ---------------------------------------------------------------- */

const char *prov_fault_name(enum prov_fault f)
{
	static const char *const names[] = { "ok", "altered", "removed", "inserted",
					      "reordered", "broken" };

	return (unsigned)f < sizeof(names) / sizeof(names[0]) ? names[f] : "broken";
}

static bool eq(const uint8_t *a, const uint8_t *b)
{
	return !memcmp(a, b, PROV_HASH_LEN);
}

enum prov_fault prov_walk(const struct prov_entry *e, size_t n, size_t *at)
{
	const uint8_t *last, *before = NULL;
	int64_t lastn;

	*at = 0;
	if (!n)
		return PROV_OK;
	if (e[0].n == 1 && !eq(e[0].ph, ZERO))
		return PROV_BROKEN;
	last = e[0].h;
	lastn = e[0].n;
	for (size_t j = 1; j < n; j++) {
		bool more = j + 1 < n;

		if (eq(e[j].ph, last) && e[j].n == lastn + 1) {
			before = last;
			last = e[j].h;
			lastn = e[j].n;
			continue;
		}
		*at = j;
		if (eq(e[j].ph, last))                      /* its position changed */
			return PROV_ALTERED;
		if (more && eq(e[j].ph, e[j + 1].h) && eq(e[j + 1].ph, last))
			return PROV_REORDERED;
		if (more && eq(e[j + 1].ph, last))
			return PROV_INSERTED;
		if (before && eq(e[j].ph, before) && e[j].n <= lastn) {
			*at = j - 1;                        /* the one before fitted by chance */
			return PROV_INSERTED;
		}
		if (e[j].n == lastn + 1) {
			/* the one before changed (this one is intact: the next
			 * chains to it), or this one's own ph changed */
			if (!more || eq(e[j + 1].ph, e[j].h))
				*at = j - 1;
			return PROV_ALTERED;
		}
		if (e[j].n > lastn + 1)
			return PROV_REMOVED;
		return PROV_BROKEN;
	}
	return PROV_OK;
}
