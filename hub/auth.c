/*
 * auth.c - gateway JWTs, API keys and device patterns (see auth.h).
 *
 * JWT path, cheapest checks first:
 *   1. length cap and shape: three base64url segments, nothing else;
 *   2. header: strict base64url, JSON object without duplicate keys, no
 *      "crit", "alg" equal to the configured algorithm (this refuses
 *      "alg":"none" and HS256-signed-with-the-public-PEM before libjwt
 *      ever sees the token);
 *   3. payload: strict base64url, JSON object without duplicate keys;
 *   4. jwt_decode() with the configured key (never NULL), then the alg pinned
 *      again with jwt_get_alg();
 *   5. claims from jwt_get_grants_json(), checked here: libjwt 1.10.2
 *      validates none of them.
 * No token or key is ever copied into an error message.
 */
#include "hub/auth.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include <jansson.h>
#include <jwt.h>
#include <openssl/bio.h>
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>

#include "hub/util.h"

#define AUTH_JWT_MAX_LEN	8192		/* whole compact token */
#define AUTH_JWT_MAX_HEADER	1024		/* encoded header segment */
#define AUTH_ID_MAX		128
#define AUTH_API_KEY_MAX_LEN	4096		/* presented API key */
#define AUTH_KEYS_FILE_MAX	(1024 * 1024)
#define AUTH_JWT_KEY_MAX	(64 * 1024)
#define AUTH_HS256_MIN_SECRET	16
#define AUTH_RSA_MIN_BITS	2048
#define AUTH_LEEWAY_MAX		3600
#define AUTH_SHA256_LEN		32

struct auth_api_key {
	unsigned char hash[AUTH_SHA256_LEN];
	char name[AUTH_ID_MAX + 1];
	unsigned scopes;
	auth_patterns devices;
	char tier[AUTH_TIER_MAX + 1];   /* "" when the key names none */
};

struct hub_auth {
	enum auth_jwt_alg alg;
	jwt_alg_t jwt_alg;
	const char *alg_name;		/* "HS256", ... (static) */
	unsigned char *jwt_key;		/* NULL: JWTs disabled, all refused */
	size_t jwt_key_len;
	char *issuer;
	char *audience;
	int64_t leeway;
	struct auth_api_key *keys;
	size_t nkeys;
};

static void auth_oom(void)
{
	fputs("auth: out of memory\n", stderr);
	abort();
}

static void *auth_xcalloc(size_t n, size_t size)
{
	void *p = calloc(n ? n : 1, size ? size : 1);

	if (!p)
		auth_oom();
	return p;
}

static char *auth_xstrndup(const char *s, size_t n)
{
	char *p = auth_xcalloc(1, n + 1);

	memcpy(p, s, n);
	return p;
}

static void auth_seterr(char *err, size_t errlen, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));

static void auth_seterr(char *err, size_t errlen, const char *fmt, ...)
{
	va_list ap;

	if (!err || !errlen)
		return;
	va_start(ap, fmt);
	vsnprintf(err, errlen, fmt, ap);
	va_end(ap);
}

static int64_t auth_sat_add(int64_t a, int64_t b)
{
	int64_t r;

	if (__builtin_add_overflow(a, b, &r))
		return b > 0 ? INT64_MAX : INT64_MIN;
	return r;
}

/* ---- ids, patterns, scopes ------------------------------------------- */

static bool auth_id_char(unsigned char c)
{
	return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
	       (c >= '0' && c <= '9') || c == '.' || c == '_' || c == ':' ||
	       c == '-';
}

/* [A-Za-z0-9._:-]{1,128} */
static bool auth_valid_id(const char *s, size_t n)
{
	if (n < 1 || n > AUTH_ID_MAX)
		return false;
	for (size_t i = 0; i < n; i++)
		if (!auth_id_char((unsigned char)s[i]))
			return false;
	return true;
}

/* An id, or an id prefix (possibly empty) followed by '*'. */
static bool auth_valid_pattern(const char *s, size_t n)
{
	if (n > 0 && s[n - 1] == '*') {
		if (n - 1 > AUTH_ID_MAX)
			return false;
		for (size_t i = 0; i + 1 < n; i++)
			if (!auth_id_char((unsigned char)s[i]))
				return false;
		return true;
	}
	return auth_valid_id(s, n);
}

void auth_patterns_free(auth_patterns *p)
{
	if (!p)
		return;
	for (size_t i = 0; i < p->n; i++)
		free(p->items[i]);
	free(p->items);
	memset(p, 0, sizeof(*p));
}

static void auth_patterns_copy(auth_patterns *dst, const auth_patterns *src)
{
	memset(dst, 0, sizeof(*dst));
	dst->all = src->all;
	if (!src->n)
		return;
	dst->items = auth_xcalloc(src->n, sizeof(*dst->items));
	for (size_t i = 0; i < src->n; i++) {
		dst->items[i] = auth_xstrndup(src->items[i], strlen(src->items[i]));
		dst->n++;
	}
}

/* Fills out from a JSON array of pattern strings (the "devices" of a key
 * or a token). Returns 0, or -1 with the reason in err (NULL: not wanted). */
static int auth_patterns_from_json(const json_t *arr, auth_patterns *out, char *err,
				   size_t errlen)
{
	size_t n;

	memset(out, 0, sizeof(*out));
	if (!json_is_array(arr)) {
		auth_seterr(err, errlen, "\"devices\" must be an array of device patterns");
		return -1;
	}
	n = json_array_size(arr);
	for (size_t i = 0; i < n; i++) {
		const json_t *v = json_array_get(arr, i);

		if (!json_is_string(v) ||
		    !auth_valid_pattern(json_string_value(v),
					json_string_length(v))) {
			auth_seterr(err, errlen, "\"devices\"[%zu] must be a device id or a "
				    "prefix ending in '*'", i);
			return -1;
		}
	}
	if (!n)
		return 0;
	out->items = auth_xcalloc(n, sizeof(*out->items));
	for (size_t i = 0; i < n; i++) {
		const json_t *v = json_array_get(arr, i);

		out->items[i] = auth_xstrndup(json_string_value(v),
					      json_string_length(v));
		out->n++;
		if (!strcmp(out->items[i], "*"))
			out->all = true;
	}
	return 0;
}

/* Bit of a known scope name, 0 for an unknown one. */
static unsigned auth_scope_bit(const char *s, size_t n)
{
	static const struct { const char *name; unsigned bit; } known[] = {
		{ "telemetry:read", AUTH_SCOPE_TELEMETRY_READ },
		{ "commands:write", AUTH_SCOPE_COMMANDS_WRITE },
		{ "admin", AUTH_SCOPE_ADMIN },
	};

	for (size_t i = 0; i < sizeof(known) / sizeof(known[0]); i++)
		if (strlen(known[i].name) == n && !memcmp(known[i].name, s, n))
			return known[i].bit;
	return 0;
}

/* JWT `scope`: space-separated string or array of strings; unknown names
 * are ignored. Returns 0, or -1 for a wrong type. */
static int auth_jwt_scopes(const json_t *v, unsigned *out)
{
	*out = 0;
	if (!v)
		return 0;
	if (json_is_string(v)) {
		const char *s = json_string_value(v);
		size_t n = json_string_length(v), i = 0;

		while (i < n) {
			size_t start;

			while (i < n && s[i] == ' ')
				i++;
			start = i;
			while (i < n && s[i] != ' ')
				i++;
			if (i > start)
				*out |= auth_scope_bit(s + start, i - start);
		}
		return 0;
	}
	if (json_is_array(v)) {
		size_t i;
		const json_t *e;

		json_array_foreach(v, i, e) {
			if (!json_is_string(e))
				return -1;
			*out |= auth_scope_bit(json_string_value(e),
					       json_string_length(e));
		}
		return 0;
	}
	return -1;
}

/* ---- base64url / hex ---------------------------------------------------- */

static int auth_b64url_val(unsigned char c)
{
	if (c >= 'A' && c <= 'Z')
		return c - 'A';
	if (c >= 'a' && c <= 'z')
		return c - 'a' + 26;
	if (c >= '0' && c <= '9')
		return c - '0' + 52;
	if (c == '-')
		return 62;
	if (c == '_')
		return 63;
	return -1;
}

/* Strict base64url: no padding, canonical (zero) trailing bits. Returns the
 * decoded length, or -1. */
static long auth_b64url_decode(const char *in, size_t len, unsigned char *out,
			       size_t cap)
{
	unsigned acc = 0;
	int bits = 0;
	size_t o = 0;

	if (len % 4 == 1)
		return -1;
	for (size_t i = 0; i < len; i++) {
		int v = auth_b64url_val((unsigned char)in[i]);

		if (v < 0)
			return -1;
		acc = (acc << 6) | (unsigned)v;
		bits += 6;
		if (bits >= 8) {
			bits -= 8;
			if (o >= cap)
				return -1;
			out[o++] = (unsigned char)(acc >> bits);
			acc &= (1u << bits) - 1;
		}
	}
	if (acc)
		return -1;
	return (long)o;
}

static void auth_sha256(const void *data, size_t len,
			unsigned char out[AUTH_SHA256_LEN])
{
	unsigned int n = 0;

	if (!EVP_Digest(data, len, out, &n, EVP_sha256(), NULL) ||
	    n != AUTH_SHA256_LEN) {
		fputs("auth: SHA-256 unavailable\n", stderr);
		abort();
	}
}

void auth_sha256_hex(const void *data, size_t len, char out[65])
{
	static const char hex[] = "0123456789abcdef";
	unsigned char md[AUTH_SHA256_LEN];

	auth_sha256(data, len, md);
	for (size_t i = 0; i < AUTH_SHA256_LEN; i++) {
		out[2 * i] = hex[md[i] >> 4];
		out[2 * i + 1] = hex[md[i] & 15];
	}
	out[64] = '\0';
}

/* ---- construction ------------------------------------------------------- */

/* Checks that the PEM public key suits the algorithm, so that a wrong key
 * fails at start-up rather than on every token. */
static int auth_check_pubkey(const hub_auth *a, char *err, size_t errlen)
{
	BIO *bio;
	EVP_PKEY *pk;
	int rc = -1, id;

	bio = BIO_new_mem_buf(a->jwt_key, (int)a->jwt_key_len);
	if (!bio)
		auth_oom();
	pk = PEM_read_bio_PUBKEY(bio, NULL, NULL, NULL);
	BIO_free(bio);
	ERR_clear_error();
	if (!pk) {
		/* jwt_key is NUL-terminated (copied with one spare byte). */
		if (strstr((const char *)a->jwt_key, "PRIVATE KEY"))
			auth_seterr(err, errlen, "jwt key for %s is a private key; "
				    "give the PEM public key (BEGIN PUBLIC KEY)",
				    a->alg_name);
		else
			auth_seterr(err, errlen, "jwt key for %s is not a PEM "
				    "public key (BEGIN PUBLIC KEY)", a->alg_name);
		return -1;
	}
	id = EVP_PKEY_get_base_id(pk);
	if (a->alg == AUTH_ALG_RS256) {
		if (id != EVP_PKEY_RSA) {
			auth_seterr(err, errlen, "jwt key for RS256 must be an "
				    "RSA public key, got %s",
				    id == EVP_PKEY_EC ? "an EC key" :
				    "another key type");
			goto out;
		}
		if (EVP_PKEY_get_bits(pk) < AUTH_RSA_MIN_BITS) {
			auth_seterr(err, errlen, "jwt key for RS256 has %d bits; "
				    "at least %d are required",
				    EVP_PKEY_get_bits(pk), AUTH_RSA_MIN_BITS);
			goto out;
		}
	} else {
		char group[64] = "";
		size_t glen = 0;

		if (id != EVP_PKEY_EC) {
			auth_seterr(err, errlen, "jwt key for ES256 must be an "
				    "EC P-256 public key, got %s",
				    id == EVP_PKEY_RSA ? "an RSA key" :
				    "another key type");
			goto out;
		}
		if (!EVP_PKEY_get_group_name(pk, group, sizeof(group), &glen) ||
		    (strcmp(group, "prime256v1") && strcmp(group, "P-256"))) {
			ERR_clear_error();
			auth_seterr(err, errlen, "jwt key for ES256 must be on "
				    "curve P-256 (prime256v1), got %s",
				    group[0] ? group : "an unknown curve");
			goto out;
		}
	}
	rc = 0;
out:
	EVP_PKEY_free(pk);
	return rc;
}

static int auth_setup_jwt(hub_auth *a, const auth_config *cfg, char *err,
			  size_t errlen)
{
	switch (cfg->alg) {
	case AUTH_ALG_HS256:
		a->jwt_alg = JWT_ALG_HS256;
		a->alg_name = "HS256";
		break;
	case AUTH_ALG_RS256:
		a->jwt_alg = JWT_ALG_RS256;
		a->alg_name = "RS256";
		break;
	case AUTH_ALG_ES256:
		a->jwt_alg = JWT_ALG_ES256;
		a->alg_name = "ES256";
		break;
	default:
		auth_seterr(err, errlen, "jwt alg must be HS256, RS256 or ES256");
		return -1;
	}
	a->alg = cfg->alg;
	if (cfg->leeway_s < 0 || cfg->leeway_s > AUTH_LEEWAY_MAX) {
		auth_seterr(err, errlen, "jwt leeway must be 0..%d seconds, got %d",
			    AUTH_LEEWAY_MAX, cfg->leeway_s);
		return -1;
	}
	a->leeway = cfg->leeway_s;
	if (cfg->issuer)
		a->issuer = auth_xstrndup(cfg->issuer, strlen(cfg->issuer));
	if (cfg->audience)
		a->audience = auth_xstrndup(cfg->audience,
					    strlen(cfg->audience));

	/* No key: JWTs are disabled and every token is refused. */
	if (!cfg->jwt_key || !cfg->jwt_key_len)
		return 0;
	if (cfg->jwt_key_len > AUTH_JWT_KEY_MAX) {
		auth_seterr(err, errlen, "jwt key is %zu bytes; at most %d",
			    cfg->jwt_key_len, AUTH_JWT_KEY_MAX);
		return -1;
	}
	if (cfg->alg == AUTH_ALG_HS256 &&
	    cfg->jwt_key_len < AUTH_HS256_MIN_SECRET) {
		auth_seterr(err, errlen, "HS256 secret is %zu bytes; at least %d "
			    "are required (32 random bytes recommended)",
			    cfg->jwt_key_len, AUTH_HS256_MIN_SECRET);
		return -1;
	}
	a->jwt_key = auth_xcalloc(1, cfg->jwt_key_len + 1);
	memcpy(a->jwt_key, cfg->jwt_key, cfg->jwt_key_len);
	a->jwt_key_len = cfg->jwt_key_len;
	if (cfg->alg != AUTH_ALG_HS256)
		return auth_check_pubkey(a, err, errlen);
	return 0;
}

/* Reads a whole file of at most max bytes. Returns a NUL-terminated buffer
 * (free it) or NULL with the reason in err. */
static char *auth_read_file(const char *what, const char *path, size_t max,
			    size_t *lenp, char *err, size_t errlen)
{
	FILE *f = fopen(path, "rb");
	struct stat st;
	char *buf;
	size_t n;

	if (!f) {
		auth_seterr(err, errlen, "%s %s: %s", what, path, strerror(errno));
		return NULL;
	}
	if (fstat(fileno(f), &st) || !S_ISREG(st.st_mode)) {
		auth_seterr(err, errlen, "%s %s: not a regular file", what, path);
		fclose(f);
		return NULL;
	}
	if ((unsigned long long)st.st_size > max) {
		auth_seterr(err, errlen, "%s %s: larger than %zu bytes", what,
			    path, max);
		fclose(f);
		return NULL;
	}
	buf = auth_xcalloc(1, (size_t)st.st_size + 1);
	n = fread(buf, 1, (size_t)st.st_size, f);
	if (ferror(f)) {
		auth_seterr(err, errlen, "%s %s: read error", what, path);
		fclose(f);
		free(buf);
		return NULL;
	}
	fclose(f);
	*lenp = n;
	return buf;
}

/* jansson's error text ends in "near '<input>'": drop that part so that file
 * contents (which might hold a pasted key) never reach a log line. */
static void auth_json_errtext(const json_error_t *je, char *out, size_t outlen)
{
	char *near;

	snprintf(out, outlen, "%s", je->text);
	near = strstr(out, " near ");
	if (near)
		*near = '\0';
}

static int auth_parse_api_key(const json_t *e, size_t idx, const char *path,
			      struct auth_api_key *k, char *err, size_t errlen)
{
	const char *field;
	const json_t *v, *s;
	char why[96];
	size_t i;

	if (!json_is_object(e)) {
		auth_seterr(err, errlen, "api keys file %s: entry %zu: must be "
			    "an object", path, idx);
		return -1;
	}
	json_object_foreach((json_t *)e, field, v) {
		if (strcmp(field, "name") && strcmp(field, "sha256") &&
		    strcmp(field, "scopes") && strcmp(field, "devices") &&
		    strcmp(field, "tier")) {
			auth_seterr(err, errlen, "api keys file %s: entry %zu: "
				    "unknown field \"%.32s\" (known: name, sha256, "
				    "scopes, devices, tier)", path, idx, field);
			return -1;
		}
	}
	v = json_object_get(e, "name");
	if (!json_is_string(v) ||
	    !auth_valid_id(json_string_value(v), json_string_length(v))) {
		auth_seterr(err, errlen, "api keys file %s: entry %zu: \"name\" "
			    "must be a string of 1-%d characters [A-Za-z0-9._:-]",
			    path, idx, AUTH_ID_MAX);
		return -1;
	}
	memcpy(k->name, json_string_value(v), json_string_length(v) + 1);

	v = json_object_get(e, "sha256");
	if (!json_is_string(v) ||
	    hub_unhex(json_string_value(v), json_string_length(v), k->hash,
		      AUTH_SHA256_LEN)) {
		auth_seterr(err, errlen, "api keys file %s: entry %zu (%s): "
			    "\"sha256\" must be 64 hex digits, the SHA-256 of "
			    "the key (iot-token hash-key)", path, idx, k->name);
		return -1;
	}

	v = json_object_get(e, "scopes");
	if (!json_is_array(v)) {
		auth_seterr(err, errlen, "api keys file %s: entry %zu (%s): "
			    "\"scopes\" must be an array of strings", path, idx,
			    k->name);
		return -1;
	}
	json_array_foreach(v, i, s) {
		unsigned bit;

		if (!json_is_string(s)) {
			auth_seterr(err, errlen, "api keys file %s: entry %zu "
				    "(%s): \"scopes\"[%zu] must be a string", path,
				    idx, k->name, i);
			return -1;
		}
		bit = auth_scope_bit(json_string_value(s), json_string_length(s));
		if (!bit) {
			auth_seterr(err, errlen, "api keys file %s: entry %zu "
				    "(%s): \"scopes\"[%zu] is not a known scope "
				    "(telemetry:read, commands:write, admin)",
				    path, idx, k->name, i);
			return -1;
		}
		k->scopes |= bit;
	}

	v = json_object_get(e, "tier");
	if (v && (!json_is_string(v) || !json_string_length(v) ||
		  json_string_length(v) > AUTH_TIER_MAX)) {
		auth_seterr(err, errlen, "api keys file %s: entry %zu (%s): \"tier\" must be "
			    "a string of 1-%d characters (a tier of api-tiers)", path, idx,
			    k->name, AUTH_TIER_MAX);
		return -1;
	}
	if (v)
		memcpy(k->tier, json_string_value(v), json_string_length(v) + 1);

	v = json_object_get(e, "devices");
	if (!v) {
		k->devices.all = true;
		return 0;
	}
	if (auth_patterns_from_json(v, &k->devices, why, sizeof(why))) {
		auth_seterr(err, errlen, "api keys file %s: entry %zu (%s): %s", path, idx,
			    k->name, why);
		return -1;
	}
	return 0;
}

static int auth_load_api_keys(hub_auth *a, const char *path, char *err,
			      size_t errlen)
{
	json_error_t je;
	json_t *root;
	char *buf, text[JSON_ERROR_TEXT_LENGTH];
	size_t len = 0, n;
	int rc = -1;

	buf = auth_read_file("api keys file", path, AUTH_KEYS_FILE_MAX, &len,
			     err, errlen);
	if (!buf)
		return -1;
	root = json_loadb(buf, len, JSON_REJECT_DUPLICATES, &je);
	OPENSSL_cleanse(buf, len);
	free(buf);
	if (!root) {
		auth_json_errtext(&je, text, sizeof(text));
		auth_seterr(err, errlen, "api keys file %s: line %d column %d: %s",
			    path, je.line, je.column, text);
		return -1;
	}
	if (!json_is_array(root)) {
		auth_seterr(err, errlen, "api keys file %s: must be a JSON array "
			    "of {\"name\",\"sha256\",\"scopes\",\"devices\"}", path);
		goto out;
	}
	n = json_array_size(root);
	a->keys = auth_xcalloc(n, sizeof(*a->keys));
	for (size_t i = 0; i < n; i++) {
		struct auth_api_key *k = &a->keys[i];

		a->nkeys++;
		if (auth_parse_api_key(json_array_get(root, i), i, path, k, err,
				       errlen))
			goto out;
		for (size_t j = 0; j < i; j++) {
			if (!memcmp(a->keys[j].hash, k->hash, AUTH_SHA256_LEN)) {
				auth_seterr(err, errlen, "api keys file %s: entry "
					    "%zu (%s): \"sha256\" repeats entry "
					    "%zu", path, i, k->name, j);
				goto out;
			}
		}
	}
	rc = 0;
out:
	json_decref(root);
	return rc;
}

hub_auth *auth_new(const auth_config *cfg, char *err, size_t errlen)
{
	hub_auth *a;

	if (err && errlen)
		err[0] = '\0';
	if (!cfg) {
		auth_seterr(err, errlen, "no auth configuration");
		return NULL;
	}
	a = auth_xcalloc(1, sizeof(*a));
	if (auth_setup_jwt(a, cfg, err, errlen))
		goto fail;
	if (cfg->api_keys_file &&
	    auth_load_api_keys(a, cfg->api_keys_file, err, errlen))
		goto fail;
	return a;
fail:
	auth_free(a);
	return NULL;
}

void auth_free(hub_auth *a)
{
	if (!a)
		return;
	if (a->jwt_key) {
		OPENSSL_cleanse(a->jwt_key, a->jwt_key_len);
		free(a->jwt_key);
	}
	free(a->issuer);
	free(a->audience);
	for (size_t i = 0; i < a->nkeys; i++)
		auth_patterns_free(&a->keys[i].devices);
	if (a->keys)
		OPENSSL_cleanse(a->keys, a->nkeys * sizeof(*a->keys));
	free(a->keys);
	free(a);
}

const char *auth_strerror(enum auth_result r)
{
	switch (r) {
	case AUTH_OK:			return "ok";
	case AUTH_MALFORMED:		return "malformed token";
	case AUTH_BAD_ALG:		return "token algorithm not accepted";
	case AUTH_BAD_SIGNATURE:	return "bad token signature";
	case AUTH_EXPIRED:		return "token expired or without integer exp";
	case AUTH_NOT_YET:		return "token not yet valid (nbf)";
	case AUTH_BAD_ISSUER:		return "token issuer not accepted";
	case AUTH_BAD_AUDIENCE:		return "token audience not accepted";
	case AUTH_BAD_CLAIMS:		return "token claims invalid";
	case AUTH_UNKNOWN_KEY:		return "unknown API key";
	case AUTH__COUNT:		break;
	}
	return "unknown auth result";
}

/* ---- JWT ---------------------------------------------------------------- */

/* Decodes one segment and parses it as a JSON object (duplicates refused). */
static json_t *auth_segment_json(const char *seg, size_t len,
				 unsigned char *buf, size_t cap)
{
	long n = auth_b64url_decode(seg, len, buf, cap);
	json_t *o;

	if (n <= 0)
		return NULL;
	o = json_loadb((const char *)buf, (size_t)n, JSON_REJECT_DUPLICATES,
		       NULL);
	if (o && !json_is_object(o)) {
		json_decref(o);
		return NULL;
	}
	return o;
}

static enum auth_result auth_check_header(const hub_auth *a, const char *seg, size_t len)
{
	unsigned char buf[AUTH_JWT_MAX_HEADER];
	json_t *h, *alg, *typ;
	enum auth_result rc = AUTH_MALFORMED;

	if (len > AUTH_JWT_MAX_HEADER)
		return AUTH_MALFORMED;
	h = auth_segment_json(seg, len, buf, sizeof(buf));
	if (!h)
		return AUTH_MALFORMED;
	alg = json_object_get(h, "alg");
	typ = json_object_get(h, "typ");
	if (!json_is_string(alg))
		goto out;
	if (typ && !json_is_string(typ))
		goto out;
	/* No extension is understood, so none may be critical (RFC 7515). */
	if (json_object_get(h, "crit"))
		goto out;
	if (strcmp(json_string_value(alg), a->alg_name)) {
		rc = AUTH_BAD_ALG;
		goto out;
	}
	rc = AUTH_OK;
out:
	json_decref(h);
	return rc;
}

static enum auth_result auth_check_claims(const hub_auth *a, const json_t *c, int64_t now,
					  auth_principal *out)
{
	const json_t *v, *e;
	json_int_t exp;
	unsigned scopes;
	size_t i;
	auth_patterns devs;

	v = json_object_get(c, "exp");
	if (!json_is_integer(v))
		return AUTH_EXPIRED;
	exp = json_integer_value(v);
	if (exp < auth_sat_add(now, -a->leeway))
		return AUTH_EXPIRED;

	v = json_object_get(c, "nbf");
	if (v && (!json_is_integer(v) ||
		  json_integer_value(v) > auth_sat_add(now, a->leeway)))
		return AUTH_NOT_YET;

	if (a->issuer) {
		v = json_object_get(c, "iss");
		if (!json_is_string(v) || strcmp(json_string_value(v), a->issuer))
			return AUTH_BAD_ISSUER;
	}

	if (a->audience) {
		bool found = false;

		v = json_object_get(c, "aud");
		if (json_is_string(v)) {
			found = !strcmp(json_string_value(v), a->audience);
		} else if (json_is_array(v)) {
			json_array_foreach(v, i, e) {
				if (json_is_string(e) &&
				    !strcmp(json_string_value(e), a->audience))
					found = true;
			}
		}
		if (!found)
			return AUTH_BAD_AUDIENCE;
	}

	v = json_object_get(c, "sub");
	if (!json_is_string(v) ||
	    !auth_valid_id(json_string_value(v), json_string_length(v)))
		return AUTH_BAD_CLAIMS;

	if (auth_jwt_scopes(json_object_get(c, "scope"), &scopes))
		return AUTH_BAD_CLAIMS;

	memset(&devs, 0, sizeof(devs));
	e = json_object_get(c, "devices");
	if (e && auth_patterns_from_json(e, &devs, NULL, 0))
		return AUTH_BAD_CLAIMS;

	if (!out) {
		auth_patterns_free(&devs);
		return AUTH_OK;
	}
	memset(out, 0, sizeof(*out));
	memcpy(out->name, json_string_value(v), json_string_length(v) + 1);
	out->scopes = scopes;
	out->devices = devs;
	out->has_devices_claim = e != NULL;
	out->exp = exp;
	out->is_api_key = false;
	v = json_object_get(c, "jti");
	if (json_is_string(v) && json_string_length(v) > 0 &&
	    json_string_length(v) < sizeof(out->jti))
		memcpy(out->jti, json_string_value(v), json_string_length(v) + 1);
	return AUTH_OK;
}

enum auth_result auth_verify_jwt(const hub_auth *a, const char *token, size_t len,
				 int64_t now_s, auth_principal *out)
{
	char tok[AUTH_JWT_MAX_LEN + 1];
	unsigned char pbuf[AUTH_JWT_MAX_LEN];
	size_t dot[2], ndot = 0;
	jwt_t *j = NULL;
	json_t *claims;
	char *grants;
	enum auth_result rc;
	int jrc;

	if (!a || !token || len == 0 || len > AUTH_JWT_MAX_LEN)
		return AUTH_MALFORMED;
	for (size_t i = 0; i < len; i++) {
		if (token[i] == '.') {
			if (ndot == 2)
				return AUTH_MALFORMED;
			dot[ndot++] = i;
		} else if (auth_b64url_val((unsigned char)token[i]) < 0) {
			return AUTH_MALFORMED;
		}
	}
	if (ndot != 2 || dot[0] == 0 || dot[1] == dot[0] + 1)
		return AUTH_MALFORMED;

	rc = auth_check_header(a, token, dot[0]);
	if (rc)
		return rc;
	claims = auth_segment_json(token + dot[0] + 1, dot[1] - dot[0] - 1,
				   pbuf, sizeof(pbuf));
	if (!claims)
		return AUTH_MALFORMED;
	json_decref(claims);
	if (dot[1] + 1 == len || !a->jwt_key)
		return AUTH_BAD_SIGNATURE;

	memcpy(tok, token, len);
	tok[len] = '\0';
	jrc = jwt_decode(&j, tok, a->jwt_key, (int)a->jwt_key_len);
	OPENSSL_cleanse(tok, len);
	ERR_clear_error();
	if (jrc || !j) {
		jwt_free(j);
		return AUTH_BAD_SIGNATURE;
	}
	if (jwt_get_alg(j) != a->jwt_alg) {
		jwt_free(j);
		return AUTH_BAD_ALG;
	}
	grants = jwt_get_grants_json(j, NULL);
	jwt_free(j);
	if (!grants)
		return AUTH_MALFORMED;
	claims = json_loads(grants, JSON_REJECT_DUPLICATES, NULL);
	free(grants);
	if (!json_is_object(claims)) {
		json_decref(claims);
		return AUTH_MALFORMED;
	}
	rc = auth_check_claims(a, claims, now_s, out);
	json_decref(claims);
	return rc;
}

/* ---- API keys ----------------------------------------------------------- */

enum auth_result auth_check_api_key(const hub_auth *a, const char *key, size_t len,
				    auth_principal *out)
{
	unsigned char md[AUTH_SHA256_LEN];
	size_t match = 0;
	unsigned found = 0;
	const struct auth_api_key *k;

	if (!a || !key || len == 0 || len > AUTH_API_KEY_MAX_LEN)
		return AUTH_UNKNOWN_KEY;
	auth_sha256(key, len, md);
	/* Look at every entry, whatever matched, and select without a branch
	 * on the comparison result. */
	for (size_t i = 0; i < a->nkeys; i++) {
		unsigned eq = CRYPTO_memcmp(md, a->keys[i].hash,
					    AUTH_SHA256_LEN) == 0;
		size_t mask = (size_t)0 - (size_t)eq;

		match = (match & ~mask) | (i & mask);
		found |= eq;
	}
	OPENSSL_cleanse(md, sizeof(md));
	if (!found)
		return AUTH_UNKNOWN_KEY;
	if (!out)
		return AUTH_OK;
	k = &a->keys[match];
	memset(out, 0, sizeof(*out));
	memcpy(out->name, k->name, sizeof(out->name));
	out->scopes = k->scopes;
	auth_patterns_copy(&out->devices, &k->devices);
	memcpy(out->tier, k->tier, sizeof(out->tier));
	out->exp = 0;
	out->is_api_key = true;
	return AUTH_OK;
}

/* ---- principals and patterns ------------------------------------------- */

void auth_principal_clear(auth_principal *p)
{
	if (!p)
		return;
	auth_patterns_free(&p->devices);
	memset(p, 0, sizeof(*p));
}

void auth_principal_copy(auth_principal *dst, const auth_principal *src)
{
	auth_patterns devs;

	auth_patterns_copy(&devs, &src->devices);
	*dst = *src;
	dst->devices = devs;
}

bool auth_has_scope(const auth_principal *p, unsigned scope)
{
	if (!p)
		return false;
	if (p->scopes & AUTH_SCOPE_ADMIN)
		return true;
	return (p->scopes & scope) == scope;
}

bool auth_patterns_match(const auth_patterns *pats, const char *device)
{
	if (!pats || !device)
		return false;
	if (pats->all)
		return true;
	for (size_t i = 0; i < pats->n; i++) {
		const char *p = pats->items[i];
		size_t n = strlen(p);

		if (n && p[n - 1] == '*') {
			if (!strncmp(device, p, n - 1))
				return true;
		} else if (!strcmp(device, p)) {
			return true;
		}
	}
	return false;
}
