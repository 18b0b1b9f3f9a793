/*
 * test_auth.c - unit tests for hub/auth.c.
 *
 * Keys are generated at run time into memory (RSA 2048, EC P-256); tokens are
 * minted with libjwt. Set HUB_AUTH_BENCH=N to also time N verifications per
 * algorithm.
 */
#define _GNU_SOURCE
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <jansson.h>
#include <jwt.h>
#include <openssl/bio.h>
#include <openssl/evp.h>
#include <openssl/pem.h>

#include "hub/auth.h"

#define NOW 1732345678LL
#define HS_SECRET "0123456789abcdef0123456789abcdef"

struct keypair {
	char *priv;
	char *pub;
};

static struct keypair rsa, ec, ec_other;

/* ---- helpers ------------------------------------------------------------ */

static char *bio_string(BIO *bio)
{
	char *data, *s;
	long n = BIO_get_mem_data(bio, &data);

	assert_true(n > 0);
	s = malloc((size_t)n + 1);
	assert_non_null(s);
	memcpy(s, data, (size_t)n);
	s[n] = '\0';
	return s;
}

static void keypair_from(EVP_PKEY *pk, struct keypair *kp)
{
	BIO *b = BIO_new(BIO_s_mem());

	assert_non_null(pk);
	assert_non_null(b);
	assert_int_equal(PEM_write_bio_PrivateKey(b, pk, NULL, NULL, 0, NULL,
						  NULL), 1);
	kp->priv = bio_string(b);
	BIO_free(b);
	b = BIO_new(BIO_s_mem());
	assert_int_equal(PEM_write_bio_PUBKEY(b, pk), 1);
	kp->pub = bio_string(b);
	BIO_free(b);
	EVP_PKEY_free(pk);
}

static void keypair_free(struct keypair *kp)
{
	free(kp->priv);
	free(kp->pub);
	memset(kp, 0, sizeof(*kp));
}

static int group_setup(void **state)
{
	(void)state;
	keypair_from(EVP_RSA_gen(2048), &rsa);
	keypair_from(EVP_EC_gen("P-256"), &ec);
	keypair_from(EVP_EC_gen("P-256"), &ec_other);
	return 0;
}

static int group_teardown(void **state)
{
	(void)state;
	keypair_free(&rsa);
	keypair_free(&ec);
	keypair_free(&ec_other);
	return 0;
}

static char *b64url(const void *data, size_t len)
{
	static const char tab[] =
		"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
	const unsigned char *p = data;
	char *out = malloc(len * 4 / 3 + 4);
	size_t o = 0, i;

	assert_non_null(out);
	for (i = 0; i + 2 < len; i += 3) {
		unsigned v = (unsigned)p[i] << 16 | (unsigned)p[i + 1] << 8 | p[i + 2];

		out[o++] = tab[v >> 18 & 63];
		out[o++] = tab[v >> 12 & 63];
		out[o++] = tab[v >> 6 & 63];
		out[o++] = tab[v & 63];
	}
	if (len - i == 1) {
		unsigned v = (unsigned)p[i] << 16;

		out[o++] = tab[v >> 18 & 63];
		out[o++] = tab[v >> 12 & 63];
	} else if (len - i == 2) {
		unsigned v = (unsigned)p[i] << 16 | (unsigned)p[i + 1] << 8;

		out[o++] = tab[v >> 18 & 63];
		out[o++] = tab[v >> 12 & 63];
		out[o++] = tab[v >> 6 & 63];
	}
	out[o] = '\0';
	return out;
}

/* "<b64(header)>.<b64(payload)>.<sig>" built by hand (sig taken as is). */
static char *hand_token(const char *header, const char *payload,
			const char *sig)
{
	char *h = b64url(header, strlen(header));
	char *p = b64url(payload, strlen(payload));
	size_t n = strlen(h) + strlen(p) + strlen(sig) + 3;
	char *t = malloc(n);

	assert_non_null(t);
	snprintf(t, n, "%s.%s.%s", h, p, sig);
	free(h);
	free(p);
	return t;
}

/* Signs claims (a JSON object text) with libjwt. free() the result. */
static char *mint_key(jwt_alg_t alg, const char *key, size_t keylen,
		      const char *claims)
{
	jwt_t *j = NULL;
	char *t;

	assert_int_equal(jwt_new(&j), 0);
	assert_int_equal(jwt_add_grants_json(j, claims), 0);
	assert_int_equal(jwt_set_alg(j, alg, (const unsigned char *)key,
				     (int)keylen), 0);
	t = jwt_encode_str(j);
	assert_non_null(t);
	jwt_free(j);
	return t;
}

static char *mint(jwt_alg_t alg, const char *claims)
{
	switch (alg) {
	case JWT_ALG_HS256:
		return mint_key(alg, HS_SECRET, strlen(HS_SECRET), claims);
	case JWT_ALG_RS256:
		return mint_key(alg, rsa.priv, strlen(rsa.priv), claims);
	case JWT_ALG_ES256:
		return mint_key(alg, ec.priv, strlen(ec.priv), claims);
	default:
		fail_msg("no key for alg %d", (int)alg);
	}
	return NULL;
}

static char *claimsf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

static char *claimsf(const char *fmt, ...)
{
	va_list ap;
	char *s = NULL;
	int n;

	va_start(ap, fmt);
	n = vasprintf(&s, fmt, ap);
	va_end(ap);
	assert_true(n >= 0);
	return s;
}

struct hub_opts {
	const char *iss;
	const char *aud;
	int leeway;
	const char *keys_file;
};

static hub_auth *hub_for(enum auth_jwt_alg alg, const struct hub_opts *o)
{
	auth_config cfg = { .alg = alg };
	char err[256] = "";
	hub_auth *a;

	switch (alg) {
	case AUTH_ALG_HS256:
		cfg.jwt_key = HS_SECRET;
		break;
	case AUTH_ALG_RS256:
		cfg.jwt_key = rsa.pub;
		break;
	case AUTH_ALG_ES256:
		cfg.jwt_key = ec.pub;
		break;
	}
	cfg.jwt_key_len = strlen(cfg.jwt_key);
	if (o) {
		cfg.issuer = o->iss;
		cfg.audience = o->aud;
		cfg.leeway_s = o->leeway;
		cfg.api_keys_file = o->keys_file;
	}
	a = auth_new(&cfg, err, sizeof(err));
	if (!a)
		fail_msg("auth_new: %s", err);
	return a;
}

static int verify_str(const hub_auth *a, const char *tok, auth_principal *p)
{
	return auth_verify_jwt(a, tok, strlen(tok), NOW, p);
}

/* Mints claims with alg, verifies with a hub for the same alg. */
static int roundtrip(jwt_alg_t jalg, enum auth_jwt_alg alg,
		     const struct hub_opts *o, const char *claims,
		     auth_principal *p)
{
	hub_auth *a = hub_for(alg, o);
	char *t = mint(jalg, claims);
	int rc = verify_str(a, t, p);

	free(t);
	auth_free(a);
	return rc;
}

static int hs(const char *claims)
{
	auth_principal p = { 0 };
	int rc = roundtrip(JWT_ALG_HS256, AUTH_ALG_HS256, NULL, claims, &p);

	auth_principal_clear(&p);
	return rc;
}

static char *write_tmp(const char *contents)
{
	char *path = strdup("/tmp/test_auth_XXXXXX");
	int fd;

	assert_non_null(path);
	fd = mkstemp(path);
	assert_true(fd >= 0);
	assert_int_equal(write(fd, contents, strlen(contents)),
			 (ssize_t)strlen(contents));
	close(fd);
	return path;
}

/* ---- valid tokens ------------------------------------------------------- */

static void check_valid(jwt_alg_t jalg, enum auth_jwt_alg alg)
{
	auth_principal p = { 0 };
	char *c = claimsf("{\"sub\":\"gw-1\",\"exp\":%lld,\"iat\":%lld,"
			  "\"devices\":[\"t-*\",\"x.1\"],"
			  "\"scope\":\"telemetry:read commands:write\"}",
			  NOW + 600, NOW);

	assert_int_equal(roundtrip(jalg, alg, NULL, c, &p), AUTH_OK);
	assert_string_equal(p.name, "gw-1");
	assert_int_equal(p.exp, NOW + 600);
	assert_false(p.is_api_key);
	assert_int_equal(p.scopes,
			 AUTH_SCOPE_TELEMETRY_READ | AUTH_SCOPE_COMMANDS_WRITE);
	assert_int_equal(p.devices.n, 2);
	assert_false(p.devices.all);
	assert_string_equal(p.devices.items[0], "t-*");
	assert_string_equal(p.devices.items[1], "x.1");
	assert_true(auth_patterns_match(&p.devices, "t-17"));
	assert_true(auth_patterns_match(&p.devices, "x.1"));
	assert_false(auth_patterns_match(&p.devices, "x.10"));
	assert_false(auth_patterns_match(&p.devices, "u-1"));
	auth_principal_clear(&p);
	assert_int_equal(p.devices.n, 0);
	assert_null(p.devices.items);
	free(c);
}

static void test_valid_hs256(void **state)
{
	(void)state;
	check_valid(JWT_ALG_HS256, AUTH_ALG_HS256);
}

static void test_valid_rs256(void **state)
{
	(void)state;
	check_valid(JWT_ALG_RS256, AUTH_ALG_RS256);
}

static void test_valid_es256(void **state)
{
	(void)state;
	check_valid(JWT_ALG_ES256, AUTH_ALG_ES256);
}

/* ES256 signatures are JOSE R||S (64 bytes = 86 base64url chars), not DER,
 * so tokens from other libraries verify too. */
static void test_es256_signature_is_jose(void **state)
{
	char *c = claimsf("{\"sub\":\"gw-1\",\"exp\":%lld}", NOW + 600);
	char *t = mint(JWT_ALG_ES256, c);
	const char *sig = strrchr(t, '.');

	(void)state;
	assert_non_null(sig);
	assert_int_equal(strlen(sig + 1), 86);
	free(t);
	free(c);
}

/* ---- algorithm pinning -------------------------------------------------- */

static void test_alg_none_refused(void **state)
{
	char *c = claimsf("{\"sub\":\"gw-1\",\"exp\":%lld}", NOW + 600);
	char *p = b64url(c, strlen(c));
	char *t = claimsf("eyJhbGciOiJub25lIn0.%s.", p);
	char *t2 = hand_token("{\"alg\":\"none\",\"typ\":\"JWT\"}", c, "");
	char *t3 = hand_token("{\"alg\":\"none\"}", c, "c2ln");
	char *t4 = hand_token("{\"alg\":\"NONE\"}", c, "");
	const enum auth_jwt_alg algs[] = { AUTH_ALG_HS256, AUTH_ALG_RS256,
					   AUTH_ALG_ES256 };

	(void)state;
	for (size_t i = 0; i < 3; i++) {
		hub_auth *a = hub_for(algs[i], NULL);
		auth_principal pr = { 0 };

		assert_int_equal(verify_str(a, t, &pr), AUTH_BAD_ALG);
		assert_int_equal(verify_str(a, t2, &pr), AUTH_BAD_ALG);
		assert_int_equal(verify_str(a, t3, &pr), AUTH_BAD_ALG);
		assert_int_equal(verify_str(a, t4, &pr), AUTH_BAD_ALG);
		assert_string_equal(pr.name, "");
		auth_free(a);
	}
	free(t);
	free(t2);
	free(t3);
	free(t4);
	free(p);
	free(c);
}

/* HS256 signed with the public PEM as the HMAC secret: libjwt alone accepts
 * it when given that PEM (the reason for pinning); the hub must not. */
static void test_alg_confusion_refused(void **state)
{
	char *c = claimsf("{\"sub\":\"gw-1\",\"exp\":%lld}", NOW + 600);
	char *t_rsa = mint_key(JWT_ALG_HS256, rsa.pub, strlen(rsa.pub), c);
	char *t_ec = mint_key(JWT_ALG_HS256, ec.pub, strlen(ec.pub), c);
	hub_auth *a_rs = hub_for(AUTH_ALG_RS256, NULL);
	hub_auth *a_es = hub_for(AUTH_ALG_ES256, NULL);
	jwt_t *j = NULL;

	(void)state;
	assert_int_equal(jwt_decode(&j, t_rsa, (const unsigned char *)rsa.pub,
				    (int)strlen(rsa.pub)), 0);
	jwt_free(j);
	assert_int_equal(verify_str(a_rs, t_rsa, NULL), AUTH_BAD_ALG);
	assert_int_equal(verify_str(a_es, t_ec, NULL), AUTH_BAD_ALG);
	auth_free(a_rs);
	auth_free(a_es);
	free(t_rsa);
	free(t_ec);
	free(c);
}

static void test_alg_mismatch_refused(void **state)
{
	char *c = claimsf("{\"sub\":\"gw-1\",\"exp\":%lld}", NOW + 600);
	char *t_rs = mint(JWT_ALG_RS256, c);
	char *t_es = mint(JWT_ALG_ES256, c);
	char *t_hs = mint(JWT_ALG_HS256, c);
	char *t_hs512 = mint_key(JWT_ALG_HS512, HS_SECRET, strlen(HS_SECRET), c);
	hub_auth *a_hs = hub_for(AUTH_ALG_HS256, NULL);
	hub_auth *a_rs = hub_for(AUTH_ALG_RS256, NULL);
	hub_auth *a_es = hub_for(AUTH_ALG_ES256, NULL);

	(void)state;
	assert_int_equal(verify_str(a_hs, t_rs, NULL), AUTH_BAD_ALG);
	assert_int_equal(verify_str(a_hs, t_es, NULL), AUTH_BAD_ALG);
	assert_int_equal(verify_str(a_hs, t_hs512, NULL), AUTH_BAD_ALG);
	assert_int_equal(verify_str(a_rs, t_es, NULL), AUTH_BAD_ALG);
	assert_int_equal(verify_str(a_rs, t_hs, NULL), AUTH_BAD_ALG);
	assert_int_equal(verify_str(a_es, t_rs, NULL), AUTH_BAD_ALG);
	assert_int_equal(verify_str(a_es, t_hs, NULL), AUTH_BAD_ALG);
	auth_free(a_hs);
	auth_free(a_rs);
	auth_free(a_es);
	free(t_rs);
	free(t_es);
	free(t_hs);
	free(t_hs512);
	free(c);
}

/* ---- signatures --------------------------------------------------------- */

static void test_wrong_signature(void **state)
{
	char *c = claimsf("{\"sub\":\"gw-1\",\"exp\":%lld}", NOW + 600);
	char *c2 = claimsf("{\"sub\":\"gw-2\",\"exp\":%lld}", NOW + 600);
	const char *other = "another secret that is long enough";
	char *t_hs = mint_key(JWT_ALG_HS256, other, strlen(other), c);
	char *t_es = mint_key(JWT_ALG_ES256, ec_other.priv,
			      strlen(ec_other.priv), c);
	char *t_rs = mint(JWT_ALG_RS256, c);
	char *t_rs2 = mint(JWT_ALG_RS256, c2);
	char *t_ok = mint(JWT_ALG_HS256, c);
	hub_auth *a_hs = hub_for(AUTH_ALG_HS256, NULL);
	hub_auth *a_rs = hub_for(AUTH_ALG_RS256, NULL);
	hub_auth *a_es = hub_for(AUTH_ALG_ES256, NULL);
	char *spliced, *d1, *d2;
	size_t n;

	(void)state;
	assert_int_equal(verify_str(a_hs, t_hs, NULL), AUTH_BAD_SIGNATURE);
	assert_int_equal(verify_str(a_es, t_es, NULL), AUTH_BAD_SIGNATURE);

	/* gw-2's payload under gw-1's signature */
	d1 = strchr(t_rs, '.');
	d2 = strchr(strchr(t_rs2, '.') + 1, '.');
	spliced = claimsf("%.*s%.*s%s", (int)(d1 - t_rs), t_rs,
			  (int)(d2 - strchr(t_rs2, '.')), strchr(t_rs2, '.'),
			  strrchr(t_rs, '.'));
	assert_int_equal(verify_str(a_rs, spliced, NULL), AUTH_BAD_SIGNATURE);
	assert_int_equal(verify_str(a_rs, t_rs, NULL), AUTH_OK);

	/* one signature character changed; then the signature cut short */
	n = strlen(t_ok);
	t_ok[n - 2] = t_ok[n - 2] == 'A' ? 'B' : 'A';
	assert_int_equal(verify_str(a_hs, t_ok, NULL), AUTH_BAD_SIGNATURE);
	t_ok[n - 5] = '\0';
	assert_int_equal(verify_str(a_hs, t_ok, NULL), AUTH_BAD_SIGNATURE);
	/* empty signature */
	*(strrchr(t_ok, '.') + 1) = '\0';
	assert_int_equal(verify_str(a_hs, t_ok, NULL), AUTH_BAD_SIGNATURE);

	auth_free(a_hs);
	auth_free(a_rs);
	auth_free(a_es);
	free(spliced);
	free(t_hs);
	free(t_es);
	free(t_rs);
	free(t_rs2);
	free(t_ok);
	free(c);
	free(c2);
}

static void test_jwt_disabled_without_key(void **state)
{
	auth_config cfg = { .alg = AUTH_ALG_HS256 };
	char err[128];
	hub_auth *a = auth_new(&cfg, err, sizeof(err));
	char *c = claimsf("{\"sub\":\"gw-1\",\"exp\":%lld}", NOW + 600);
	char *t = mint(JWT_ALG_HS256, c);

	(void)state;
	assert_non_null(a);
	assert_int_equal(verify_str(a, t, NULL), AUTH_BAD_SIGNATURE);
	auth_free(a);
	free(t);
	free(c);
}

/* ---- exp / nbf ---------------------------------------------------------- */

static void test_expired(void **state)
{
	auth_principal p = { 0 };
	struct hub_opts o = { .leeway = 30 };
	char *c;

	(void)state;
	c = claimsf("{\"sub\":\"g\",\"exp\":%lld}", NOW - 1);
	assert_int_equal(hs(c), AUTH_EXPIRED);
	free(c);
	c = claimsf("{\"sub\":\"g\",\"exp\":%lld}", NOW);
	assert_int_equal(hs(c), AUTH_OK);
	free(c);

	c = claimsf("{\"sub\":\"g\",\"exp\":%lld}", NOW - 30);
	assert_int_equal(roundtrip(JWT_ALG_HS256, AUTH_ALG_HS256, &o, c, &p),
			 AUTH_OK);
	auth_principal_clear(&p);
	free(c);
	c = claimsf("{\"sub\":\"g\",\"exp\":%lld}", NOW - 31);
	assert_int_equal(roundtrip(JWT_ALG_HS256, AUTH_ALG_HS256, &o, c, &p),
			 AUTH_EXPIRED);
	free(c);

	/* extremes must not overflow */
	assert_int_equal(hs("{\"sub\":\"g\",\"exp\":9223372036854775807}"),
			 AUTH_OK);
	assert_int_equal(hs("{\"sub\":\"g\",\"exp\":-9223372036854775807}"),
			 AUTH_EXPIRED);
}

static void test_exp_missing_or_not_integer(void **state)
{
	char *c;

	(void)state;
	assert_int_equal(hs("{\"sub\":\"g\"}"), AUTH_EXPIRED);
	c = claimsf("{\"sub\":\"g\",\"exp\":%lld.5}", NOW + 600);
	assert_int_equal(hs(c), AUTH_EXPIRED);
	free(c);
	assert_int_equal(hs("{\"sub\":\"g\",\"exp\":1000000000.5}"),
			 AUTH_EXPIRED);
	c = claimsf("{\"sub\":\"g\",\"exp\":%lld.0}", NOW + 600);
	assert_int_equal(hs(c), AUTH_EXPIRED);
	free(c);
	c = claimsf("{\"sub\":\"g\",\"exp\":\"%lld\"}", NOW + 600);
	assert_int_equal(hs(c), AUTH_EXPIRED);
	free(c);
	assert_int_equal(hs("{\"sub\":\"g\",\"exp\":null}"), AUTH_EXPIRED);
	assert_int_equal(hs("{\"sub\":\"g\",\"exp\":true}"), AUTH_EXPIRED);
}

static void test_nbf(void **state)
{
	auth_principal p = { 0 };
	struct hub_opts o = { .leeway = 30 };
	char *c;

	(void)state;
	c = claimsf("{\"sub\":\"g\",\"exp\":%lld,\"nbf\":%lld}", NOW + 600,
		    NOW + 1);
	assert_int_equal(hs(c), AUTH_NOT_YET);
	free(c);
	c = claimsf("{\"sub\":\"g\",\"exp\":%lld,\"nbf\":%lld}", NOW + 600, NOW);
	assert_int_equal(hs(c), AUTH_OK);
	free(c);
	c = claimsf("{\"sub\":\"g\",\"exp\":%lld,\"nbf\":%lld}", NOW + 600,
		    NOW + 30);
	assert_int_equal(roundtrip(JWT_ALG_HS256, AUTH_ALG_HS256, &o, c, &p),
			 AUTH_OK);
	auth_principal_clear(&p);
	free(c);
	c = claimsf("{\"sub\":\"g\",\"exp\":%lld,\"nbf\":%lld}", NOW + 600,
		    NOW + 31);
	assert_int_equal(roundtrip(JWT_ALG_HS256, AUTH_ALG_HS256, &o, c, &p),
			 AUTH_NOT_YET);
	free(c);
	c = claimsf("{\"sub\":\"g\",\"exp\":%lld,\"nbf\":%lld.5}", NOW + 600,
		    NOW - 100);
	assert_int_equal(hs(c), AUTH_NOT_YET);
	free(c);
	c = claimsf("{\"sub\":\"g\",\"exp\":%lld,\"nbf\":9223372036854775807}",
		    NOW + 600);
	assert_int_equal(hs(c), AUTH_NOT_YET);
	free(c);
}

/* ---- iss / aud ---------------------------------------------------------- */

static void test_issuer(void **state)
{
	struct hub_opts o = { .iss = "https://issuer.example" };
	auth_principal p = { 0 };
	const char *cases[][2] = {
		{ "", "missing" },
		{ ",\"iss\":\"https://issuer.example\"", "ok" },
		{ ",\"iss\":\"https://issuer.example/\"", "bad" },
		{ ",\"iss\":\"https://evil.example\"", "bad" },
		{ ",\"iss\":[\"https://issuer.example\"]", "bad" },
		{ ",\"iss\":null", "bad" },
	};

	(void)state;
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		char *c = claimsf("{\"sub\":\"g\",\"exp\":%lld%s}", NOW + 600,
				  cases[i][0]);
		int want = strcmp(cases[i][1], "ok") ? AUTH_BAD_ISSUER : AUTH_OK;

		assert_int_equal(roundtrip(JWT_ALG_HS256, AUTH_ALG_HS256, &o, c,
					   &p), want);
		auth_principal_clear(&p);
		free(c);
	}
	/* not configured: not checked */
	assert_int_equal(hs("{\"sub\":\"g\",\"exp\":9999999999,\"iss\":5}"),
			 AUTH_OK);
}

static void test_audience(void **state)
{
	struct hub_opts o = { .aud = "iot-hub" };
	auth_principal p = { 0 };
	const struct { const char *aud; int want; } cases[] = {
		{ "", AUTH_BAD_AUDIENCE },
		{ ",\"aud\":\"iot-hub\"", AUTH_OK },
		{ ",\"aud\":[\"other\",\"iot-hub\"]", AUTH_OK },
		{ ",\"aud\":[\"iot-hub\"]", AUTH_OK },
		{ ",\"aud\":[5,\"iot-hub\"]", AUTH_OK },
		{ ",\"aud\":[\"other\"]", AUTH_BAD_AUDIENCE },
		{ ",\"aud\":[]", AUTH_BAD_AUDIENCE },
		{ ",\"aud\":\"iot-hub2\"", AUTH_BAD_AUDIENCE },
		{ ",\"aud\":\"iot-hu\"", AUTH_BAD_AUDIENCE },
		{ ",\"aud\":7", AUTH_BAD_AUDIENCE },
		{ ",\"aud\":{\"iot-hub\":1}", AUTH_BAD_AUDIENCE },
	};

	(void)state;
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		char *c = claimsf("{\"sub\":\"g\",\"exp\":%lld%s}", NOW + 600,
				  cases[i].aud);

		assert_int_equal(roundtrip(JWT_ALG_ES256, AUTH_ALG_ES256, &o, c,
					   &p), cases[i].want);
		auth_principal_clear(&p);
		free(c);
	}
	assert_int_equal(hs("{\"sub\":\"g\",\"exp\":9999999999,\"aud\":7}"),
			 AUTH_OK);
}

static void test_issuer_and_audience_together(void **state)
{
	struct hub_opts o = { .iss = "ca", .aud = "hub" };
	auth_principal p = { 0 };
	char *c;

	(void)state;
	c = claimsf("{\"sub\":\"g\",\"exp\":%lld,\"iss\":\"ca\","
		    "\"aud\":[\"x\",\"hub\"]}", NOW + 600);
	assert_int_equal(roundtrip(JWT_ALG_RS256, AUTH_ALG_RS256, &o, c, &p),
			 AUTH_OK);
	assert_string_equal(p.name, "g");
	auth_principal_clear(&p);
	free(c);
	c = claimsf("{\"sub\":\"g\",\"exp\":%lld,\"iss\":\"ca\","
		    "\"aud\":\"x\"}", NOW + 600);
	assert_int_equal(roundtrip(JWT_ALG_RS256, AUTH_ALG_RS256, &o, c, &p),
			 AUTH_BAD_AUDIENCE);
	free(c);
}

/* ---- sub / devices / scope ---------------------------------------------- */

static void test_sub(void **state)
{
	char long_id[130];
	char *c;

	(void)state;
	assert_int_equal(hs("{\"exp\":9999999999}"), AUTH_BAD_CLAIMS);
	assert_int_equal(hs("{\"sub\":\"\",\"exp\":9999999999}"),
			 AUTH_BAD_CLAIMS);
	assert_int_equal(hs("{\"sub\":\"a b\",\"exp\":9999999999}"),
			 AUTH_BAD_CLAIMS);
	assert_int_equal(hs("{\"sub\":\"a/b\",\"exp\":9999999999}"),
			 AUTH_BAD_CLAIMS);
	assert_int_equal(hs("{\"sub\":\"t-*\",\"exp\":9999999999}"),
			 AUTH_BAD_CLAIMS);
	assert_int_equal(hs("{\"sub\":\"caf\\u00e9\",\"exp\":9999999999}"),
			 AUTH_BAD_CLAIMS);
	assert_int_equal(hs("{\"sub\":42,\"exp\":9999999999}"), AUTH_BAD_CLAIMS);
	assert_int_equal(hs("{\"sub\":[\"g\"],\"exp\":9999999999}"),
			 AUTH_BAD_CLAIMS);
	assert_int_equal(hs("{\"sub\":\"gw.A_b:c-9\",\"exp\":9999999999}"),
			 AUTH_OK);

	memset(long_id, 'a', sizeof(long_id));
	long_id[128] = '\0';
	c = claimsf("{\"sub\":\"%s\",\"exp\":9999999999}", long_id);
	assert_int_equal(hs(c), AUTH_OK);
	free(c);
	long_id[128] = 'a';
	long_id[129] = '\0';
	c = claimsf("{\"sub\":\"%s\",\"exp\":9999999999}", long_id);
	assert_int_equal(hs(c), AUTH_BAD_CLAIMS);
	free(c);
}

static void test_devices_claim(void **state)
{
	auth_principal p = { 0 };
	const struct { const char *devices; int want; } bad[] = {
		{ "\"t-*\"", AUTH_BAD_CLAIMS },
		{ "{\"t-1\":true}", AUTH_BAD_CLAIMS },
		{ "[\"t-1\",5]", AUTH_BAD_CLAIMS },
		{ "[\"t-1\",null]", AUTH_BAD_CLAIMS },
		{ "[\"\"]", AUTH_BAD_CLAIMS },
		{ "[\"t-**\"]", AUTH_BAD_CLAIMS },
		{ "[\"a*b\"]", AUTH_BAD_CLAIMS },
		{ "[\"a b\"]", AUTH_BAD_CLAIMS },
		{ "null", AUTH_BAD_CLAIMS },
	};

	(void)state;
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		char *c = claimsf("{\"sub\":\"g\",\"exp\":9999999999,"
				  "\"devices\":%s}", bad[i].devices);

		assert_int_equal(hs(c), bad[i].want);
		free(c);
	}

	/* absent: no devices */
	assert_int_equal(roundtrip(JWT_ALG_HS256, AUTH_ALG_HS256, NULL,
				   "{\"sub\":\"g\",\"exp\":9999999999}", &p),
			 AUTH_OK);
	assert_int_equal(p.devices.n, 0);
	assert_false(p.devices.all);
	assert_false(auth_patterns_match(&p.devices, "t-1"));
	auth_principal_clear(&p);

	/* empty array: no devices */
	assert_int_equal(roundtrip(JWT_ALG_HS256, AUTH_ALG_HS256, NULL,
				   "{\"sub\":\"g\",\"exp\":9999999999,"
				   "\"devices\":[]}", &p), AUTH_OK);
	assert_int_equal(p.devices.n, 0);
	assert_false(auth_patterns_match(&p.devices, "t-1"));
	auth_principal_clear(&p);

	/* "*": every device */
	assert_int_equal(roundtrip(JWT_ALG_HS256, AUTH_ALG_HS256, NULL,
				   "{\"sub\":\"g\",\"exp\":9999999999,"
				   "\"devices\":[\"*\"]}", &p), AUTH_OK);
	assert_true(p.devices.all);
	assert_true(auth_patterns_match(&p.devices, "anything"));
	auth_principal_clear(&p);
}

static void test_scope_claim(void **state)
{
	auth_principal p = { 0 };
	const struct { const char *scope; unsigned want; } ok[] = {
		{ "\"telemetry:read\"", AUTH_SCOPE_TELEMETRY_READ },
		{ "\"  telemetry:read   commands:write bogus \"",
		  AUTH_SCOPE_TELEMETRY_READ | AUTH_SCOPE_COMMANDS_WRITE },
		{ "\"\"", 0 },
		{ "\"admin\"", AUTH_SCOPE_ADMIN },
		{ "\"telemetry:readx\"", 0 },
		{ "[\"commands:write\",\"bogus\"]", AUTH_SCOPE_COMMANDS_WRITE },
		{ "[\"telemetry:read commands:write\"]", 0 },
		{ "[]", 0 },
	};

	(void)state;
	for (size_t i = 0; i < sizeof(ok) / sizeof(ok[0]); i++) {
		char *c = claimsf("{\"sub\":\"g\",\"exp\":9999999999,"
				  "\"scope\":%s}", ok[i].scope);

		assert_int_equal(roundtrip(JWT_ALG_HS256, AUTH_ALG_HS256, NULL,
					   c, &p), AUTH_OK);
		assert_int_equal(p.scopes, ok[i].want);
		auth_principal_clear(&p);
		free(c);
	}
	assert_int_equal(hs("{\"sub\":\"g\",\"exp\":9999999999,\"scope\":7}"),
			 AUTH_BAD_CLAIMS);
	assert_int_equal(hs("{\"sub\":\"g\",\"exp\":9999999999,"
			    "\"scope\":[\"admin\",1]}"), AUTH_BAD_CLAIMS);
	assert_int_equal(hs("{\"sub\":\"g\",\"exp\":9999999999,"
			    "\"scope\":{\"admin\":true}}"), AUTH_BAD_CLAIMS);

	/* no scope claim: no scopes */
	assert_int_equal(roundtrip(JWT_ALG_HS256, AUTH_ALG_HS256, NULL,
				   "{\"sub\":\"g\",\"exp\":9999999999}", &p),
			 AUTH_OK);
	assert_int_equal(p.scopes, 0);
	assert_false(auth_has_scope(&p, AUTH_SCOPE_TELEMETRY_READ));
	auth_principal_clear(&p);
}

/* ---- shape, caps, garbage ----------------------------------------------- */

/* A valid token of roughly `size` bytes (padded with device patterns). */
static char *token_of_size(size_t size)
{
	size_t cap = size + 64;
	char *c = malloc(cap), *t;
	size_t n;
	int i = 0;

	assert_non_null(c);
	n = (size_t)snprintf(c, cap, "{\"sub\":\"g\",\"exp\":9999999999,"
			     "\"devices\":[\"d-0\"");
	/* base64 grows 4/3; the header and signature add ~80 bytes */
	while ((n + 10) * 4 / 3 + 80 < size)
		n += (size_t)snprintf(c + n, cap - n, ",\"d-%d\"", ++i);
	snprintf(c + n, cap - n, "]}");
	t = mint(JWT_ALG_HS256, c);
	free(c);
	return t;
}

static void test_length_cap(void **state)
{
	hub_auth *a = hub_for(AUTH_ALG_HS256, NULL);
	auth_principal p = { 0 };
	char *small = token_of_size(8000);
	char *big = token_of_size(8300);

	(void)state;
	assert_in_range(strlen(small), 7800, 8192);
	assert_int_equal(verify_str(a, small, &p), AUTH_OK);
	assert_true(p.devices.n > 500);
	auth_principal_clear(&p);
	assert_true(strlen(big) > 8192);
	assert_int_equal(verify_str(a, big, &p), AUTH_MALFORMED);
	auth_free(a);
	free(small);
	free(big);
}

static void test_garbage(void **state)
{
	hub_auth *a = hub_for(AUTH_ALG_HS256, NULL);
	char *c = claimsf("{\"sub\":\"g\",\"exp\":%lld}", NOW + 600);
	char *good = mint(JWT_ALG_HS256, c);
	const char *strings[] = {
		"", "abc", "a.b", "a.b.c.d", "..", "...", ".a.b", "a..b",
		"eyJhbGciOiJIUzI1NiJ9", "eyJhbGciOiJIUzI1NiJ9..",
		"eyJhbGciOiJIUzI1NiJ9.e30=.c2ln", "eyJhbGciOiJIUzI1NiJ9.e30.c2ln=",
		"eyJhbGciOiJIUzI1NiJ9.e 30.c2ln", "e.e30.c2ln",
		"Bearer eyJhbGciOiJIUzI1NiJ9.e30.c2ln",
	};
	/* header and payload texts that must be refused before libjwt */
	const struct { const char *h, *p; } shaped[] = {
		{ "not json", "{}" },
		{ "[\"alg\",\"HS256\"]", "{}" },
		{ "{\"alg\":\"HS256\",\"alg\":\"none\"}", "{}" },
		{ "{\"alg\":\"HS256\",\"crit\":[\"b64\"]}", "{}" },
		{ "{\"alg\":256}", "{}" },
		{ "{\"typ\":\"JWT\"}", "{}" },
		{ "{\"alg\":\"HS256\",\"typ\":1}", "{}" },
		{ "{\"alg\":\"HS256\"} trailing", "{}" },
		{ "{\"alg\":\"HS256\"}", "not json" },
		{ "{\"alg\":\"HS256\"}", "[1,2]" },
		{ "{\"alg\":\"HS256\"}", "\"str\"" },
		{ "{\"alg\":\"HS256\"}", "{\"sub\":\"a\",\"sub\":\"b\"}" },
	};
	unsigned seed = 12345;

	(void)state;
	assert_int_equal(auth_verify_jwt(a, NULL, 0, NOW, NULL),
			 AUTH_MALFORMED);
	assert_int_equal(auth_verify_jwt(NULL, good, strlen(good), NOW, NULL),
			 AUTH_MALFORMED);
	for (size_t i = 0; i < sizeof(strings) / sizeof(strings[0]); i++)
		assert_int_equal(verify_str(a, strings[i], NULL),
				 AUTH_MALFORMED);
	for (size_t i = 0; i < sizeof(shaped) / sizeof(shaped[0]); i++) {
		char *t = hand_token(shaped[i].h, shaped[i].p, "c2lnbmF0dXJl");

		assert_int_equal(verify_str(a, t, NULL), AUTH_MALFORMED);
		free(t);
	}

	/* the good token verifies; with a NUL inside, or cut, it does not */
	assert_int_equal(verify_str(a, good, NULL), AUTH_OK);
	assert_int_equal(auth_verify_jwt(a, good, strlen(good) + 1, NOW, NULL),
			 AUTH_MALFORMED);
	assert_int_equal(auth_verify_jwt(a, good, strlen(good) - 1, NOW, NULL),
			 AUTH_BAD_SIGNATURE);
	assert_int_equal(auth_verify_jwt(a, good, 10, NOW, NULL),
			 AUTH_MALFORMED);

	/* random bytes and random mutations of a good token never pass */
	for (int i = 0; i < 20000; i++) {
		char buf[256];
		size_t n = (size_t)(rand_r(&seed) % (int)sizeof(buf));

		if (i % 2) {
			for (size_t k = 0; k < n; k++)
				buf[k] = (char)(rand_r(&seed) & 0xff);
		} else {
			n = strlen(good) < sizeof(buf) ? strlen(good) :
							 sizeof(buf);
			memcpy(buf, good, n);
			buf[rand_r(&seed) % (int)n] = (char)(rand_r(&seed) & 0xff);
			if (!memcmp(buf, good, n))
				continue;
		}
		assert_int_not_equal(auth_verify_jwt(a, buf, n, NOW, NULL),
				     AUTH_OK);
	}
	auth_free(a);
	free(good);
	free(c);
}

/* ---- configuration ------------------------------------------------------ */

static void expect_config_error(const auth_config *cfg, const char *want,
				const char *secret)
{
	char err[256] = "";
	hub_auth *a = auth_new(cfg, err, sizeof(err));

	if (a)
		fail_msg("auth_new accepted a bad config (wanted \"%s\")", want);
	if (!strstr(err, want))
		fail_msg("error \"%s\" does not mention \"%s\"", err, want);
	assert_null(strchr(err, '\n'));
	if (secret)
		assert_null(strstr(err, secret));
}

static char *pubkey_pem(EVP_PKEY *pk)
{
	BIO *b = BIO_new(BIO_s_mem());
	char *s;

	assert_int_equal(PEM_write_bio_PUBKEY(b, pk), 1);
	s = bio_string(b);
	BIO_free(b);
	EVP_PKEY_free(pk);
	return s;
}

static void test_config_errors(void **state)
{
	auth_config cfg = { .alg = AUTH_ALG_HS256 };
	char *rsa1024 = pubkey_pem(EVP_RSA_gen(1024));
	char *p384 = pubkey_pem(EVP_EC_gen("P-384"));
	const char *junk = "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n";

	(void)state;
	cfg.jwt_key = "short-secret-15";
	cfg.jwt_key_len = strlen(cfg.jwt_key);
	expect_config_error(&cfg, "at least 16", "short-secret-15");
	cfg.jwt_key = "exactly-16-bytes";
	cfg.jwt_key_len = 16;
	{
		char err[128];
		hub_auth *a = auth_new(&cfg, err, sizeof(err));

		assert_non_null(a);
		auth_free(a);
	}

	cfg.alg = AUTH_ALG_RS256;
	cfg.jwt_key = ec.pub;
	cfg.jwt_key_len = strlen(ec.pub);
	expect_config_error(&cfg, "must be an RSA public key", NULL);
	cfg.jwt_key = rsa.priv;
	cfg.jwt_key_len = strlen(rsa.priv);
	expect_config_error(&cfg, "is a private key", NULL);
	cfg.jwt_key = HS_SECRET;
	cfg.jwt_key_len = strlen(HS_SECRET);
	expect_config_error(&cfg, "not a PEM public key", HS_SECRET);
	cfg.jwt_key = junk;
	cfg.jwt_key_len = strlen(junk);
	expect_config_error(&cfg, "not a PEM public key", NULL);
	cfg.jwt_key = rsa1024;
	cfg.jwt_key_len = strlen(rsa1024);
	expect_config_error(&cfg, "1024 bits", NULL);

	cfg.alg = AUTH_ALG_ES256;
	cfg.jwt_key = rsa.pub;
	cfg.jwt_key_len = strlen(rsa.pub);
	expect_config_error(&cfg, "must be an EC P-256 public key", NULL);
	cfg.jwt_key = p384;
	cfg.jwt_key_len = strlen(p384);
	expect_config_error(&cfg, "P-256", NULL);
	cfg.jwt_key = ec_other.priv;
	cfg.jwt_key_len = strlen(ec_other.priv);
	expect_config_error(&cfg, "is a private key", NULL);

	cfg.jwt_key = ec.pub;
	cfg.jwt_key_len = strlen(ec.pub);
	cfg.leeway_s = -1;
	expect_config_error(&cfg, "leeway", NULL);
	cfg.leeway_s = 0;
	cfg.alg = (enum auth_jwt_alg)7;
	expect_config_error(&cfg, "HS256, RS256 or ES256", NULL);

	assert_null(auth_new(NULL, NULL, 0));
	auth_free(NULL);
	free(rsa1024);
	free(p384);
}

/* ---- API keys ----------------------------------------------------------- */

#define H_OPS "6e2aa3a9e7d9e5c2ff2d4ad55b1f01dcb66ad6f1fc7e0c8c4e3b1a3c2e5f7a90"

static void test_api_keys_file_errors(void **state)
{
	const struct { const char *file; const char *want; } cases[] = {
		{ "", "line 1" },
		{ "[{\"name\":\"a\"", "line 1" },
		{ "{\"name\":\"a\"}", "must be a JSON array" },
		{ "[5]", "entry 0: must be an object" },
		{ "[{\"sha256\":\"" H_OPS "\",\"scopes\":[]}]",
		  "entry 0: \"name\"" },
		{ "[{\"name\":\"a b\",\"sha256\":\"" H_OPS "\",\"scopes\":[]}]",
		  "entry 0: \"name\"" },
		{ "[{\"name\":7,\"sha256\":\"" H_OPS "\",\"scopes\":[]}]",
		  "entry 0: \"name\"" },
		{ "[{\"name\":\"a\",\"scopes\":[]}]", "entry 0 (a): \"sha256\"" },
		{ "[{\"name\":\"a\",\"sha256\":\"abc\",\"scopes\":[]}]",
		  "\"sha256\" must be 64 hex digits" },
		{ "[{\"name\":\"a\",\"sha256\":\"" H_OPS "0\",\"scopes\":[]}]",
		  "\"sha256\" must be 64 hex digits" },
		{ "[{\"name\":\"a\",\"sha256\":\"g" H_OPS "\"}]", "\"sha256\"" },
		{ "[{\"name\":\"a\",\"sha256\":\"" H_OPS "\"}]",
		  "entry 0 (a): \"scopes\" must be an array" },
		{ "[{\"name\":\"a\",\"sha256\":\"" H_OPS "\",\"scopes\":\"admin\"}]",
		  "\"scopes\" must be an array" },
		{ "[{\"name\":\"a\",\"sha256\":\"" H_OPS "\",\"scopes\":[1]}]",
		  "\"scopes\"[0] must be a string" },
		{ "[{\"name\":\"a\",\"sha256\":\"" H_OPS "\","
		  "\"scopes\":[\"admin\",\"telemetry:raed\"]}]",
		  "\"scopes\"[1] is not a known scope" },
		{ "[{\"name\":\"a\",\"sha256\":\"" H_OPS "\",\"scopes\":[],"
		  "\"devices\":\"t-*\"}]",
		  "entry 0 (a): \"devices\" must be an array of device patterns" },
		{ "[{\"name\":\"a\",\"sha256\":\"" H_OPS "\",\"scopes\":[],"
		  "\"devices\":[\"t-1\",\"t-*-*\"]}]",
		  "entry 0 (a): \"devices\"[1] must be a device id or a prefix ending in '*'" },
		{ "[{\"name\":\"a\",\"sha256\":\"" H_OPS "\",\"scopes\":[],"
		  "\"device\":[\"t-1\"]}]", "unknown field \"device\"" },
		{ "[{\"name\":\"a\",\"name\":\"b\",\"sha256\":\"" H_OPS "\","
		  "\"scopes\":[]}]", "duplicate" },
		{ "[{\"name\":\"a\",\"sha256\":\"" H_OPS "\",\"scopes\":[]},"
		  "{\"name\":\"b\",\"sha256\":\"" H_OPS "\",\"scopes\":[]}]",
		  "entry 1 (b): \"sha256\" repeats entry 0" },
	};
	auth_config cfg = { .alg = AUTH_ALG_HS256, .jwt_key = HS_SECRET,
			    .jwt_key_len = strlen(HS_SECRET) };

	(void)state;
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		char *path = write_tmp(cases[i].file);

		cfg.api_keys_file = path;
		expect_config_error(&cfg, cases[i].want, NULL);
		unlink(path);
		free(path);
	}
	/* a pasted key must not come back in the parse error */
	{
		char *path = write_tmp("[iotk_SECRETSECRETSECRET]");

		cfg.api_keys_file = path;
		expect_config_error(&cfg, "line 1", "SECRET");
		unlink(path);
		free(path);
	}
	cfg.api_keys_file = "/nonexistent/keys.json";
	expect_config_error(&cfg, "/nonexistent/keys.json: No such file", NULL);
	cfg.api_keys_file = "/tmp";
	expect_config_error(&cfg, "not a regular file", NULL);
}

static void test_api_keys_match(void **state)
{
	char h1[65], h2[65], h3[65], *file, *path;
	struct hub_opts o = { 0 };
	auth_principal p = { 0 };
	hub_auth *a;

	(void)state;
	auth_sha256_hex("iotk_ops", 8, h1);
	auth_sha256_hex("iotk_viewer", 11, h2);
	auth_sha256_hex("iotk_root", 9, h3);
	for (char *s = h2; *s; s++)	/* upper-case hex is accepted */
		if (*s >= 'a' && *s <= 'f')
			*s = (char)(*s - 'a' + 'A');
	file = claimsf("[{\"name\":\"ops\",\"sha256\":\"%s\","
		       "\"scopes\":[\"commands:write\"],\"devices\":[\"t-*\"]},"
		       "{\"name\":\"viewer\",\"sha256\":\"%s\","
		       "\"scopes\":[\"telemetry:read\"]},"
		       "{\"name\":\"root\",\"sha256\":\"%s\",\"scopes\":[\"admin\"],"
		       "\"devices\":[]}]", h1, h2, h3);
	path = write_tmp(file);
	o.keys_file = path;
	a = hub_for(AUTH_ALG_HS256, &o);

	assert_int_equal(auth_check_api_key(a, "iotk_ops", 8, &p), AUTH_OK);
	assert_string_equal(p.name, "ops");
	assert_true(p.is_api_key);
	assert_int_equal(p.exp, 0);
	assert_int_equal(p.scopes, AUTH_SCOPE_COMMANDS_WRITE);
	assert_true(auth_has_scope(&p, AUTH_SCOPE_COMMANDS_WRITE));
	assert_false(auth_has_scope(&p, AUTH_SCOPE_TELEMETRY_READ));
	assert_false(auth_has_scope(&p, AUTH_SCOPE_ADMIN));
	assert_false(p.devices.all);
	assert_int_equal(p.devices.n, 1);
	assert_true(auth_patterns_match(&p.devices, "t-9"));
	assert_false(auth_patterns_match(&p.devices, "u-9"));
	auth_principal_clear(&p);

	assert_int_equal(auth_check_api_key(a, "iotk_viewer", 11, &p), AUTH_OK);
	assert_string_equal(p.name, "viewer");
	assert_true(p.devices.all);	/* no "devices": every device */
	assert_true(auth_patterns_match(&p.devices, "any-device"));
	assert_true(auth_has_scope(&p, AUTH_SCOPE_TELEMETRY_READ));
	assert_false(auth_has_scope(&p, AUTH_SCOPE_COMMANDS_WRITE));
	auth_principal_clear(&p);

	assert_int_equal(auth_check_api_key(a, "iotk_root", 9, &p), AUTH_OK);
	assert_string_equal(p.name, "root");
	assert_true(auth_has_scope(&p, AUTH_SCOPE_TELEMETRY_READ));
	assert_true(auth_has_scope(&p, AUTH_SCOPE_COMMANDS_WRITE));
	assert_true(auth_has_scope(&p, AUTH_SCOPE_ADMIN));
	assert_true(auth_has_scope(&p, AUTH_SCOPE_TELEMETRY_READ |
				   AUTH_SCOPE_COMMANDS_WRITE));
	assert_false(p.devices.all);	/* "devices": [] means none */
	assert_false(auth_patterns_match(&p.devices, "t-1"));
	auth_principal_clear(&p);

	/* mismatches leave the principal untouched */
	assert_int_equal(auth_check_api_key(a, "iotk_op", 7, &p),
			 AUTH_UNKNOWN_KEY);
	assert_int_equal(auth_check_api_key(a, "iotk_opsx", 9, &p),
			 AUTH_UNKNOWN_KEY);
	assert_int_equal(auth_check_api_key(a, "IOTK_OPS", 8, &p),
			 AUTH_UNKNOWN_KEY);
	assert_int_equal(auth_check_api_key(a, "iotk_ops", 0, &p),
			 AUTH_UNKNOWN_KEY);
	assert_int_equal(auth_check_api_key(a, NULL, 5, &p),
			 AUTH_UNKNOWN_KEY);
	assert_int_equal(auth_check_api_key(a, h1, 64, &p),
			 AUTH_UNKNOWN_KEY);
	assert_string_equal(p.name, "");
	/* a key is not a JWT and a JWT is not a key */
	assert_int_equal(verify_str(a, "iotk_ops", NULL), AUTH_MALFORMED);

	auth_free(a);
	unlink(path);
	free(path);
	free(file);

	/* no keys file: nothing matches */
	a = hub_for(AUTH_ALG_HS256, NULL);
	assert_int_equal(auth_check_api_key(a, "iotk_ops", 8, &p),
			 AUTH_UNKNOWN_KEY);
	auth_free(a);
	assert_int_equal(auth_check_api_key(NULL, "iotk_ops", 8, &p),
			 AUTH_UNKNOWN_KEY);

	/* an empty array is a valid (empty) file */
	path = write_tmp("[]");
	o.keys_file = path;
	a = hub_for(AUTH_ALG_HS256, &o);
	assert_int_equal(auth_check_api_key(a, "iotk_ops", 8, &p),
			 AUTH_UNKNOWN_KEY);
	auth_free(a);
	unlink(path);
	free(path);
}

/* ---- patterns, principals, helpers -------------------------------------- */

static void test_patterns(void **state)
{
	char *items[] = { "t-*", "x.1", "gw:*" };
	auth_patterns pats = { .items = items, .n = 3 };
	auth_patterns none = { 0 };
	auth_patterns all = { .all = true };

	(void)state;
	assert_true(auth_patterns_match(&pats, "t-17"));
	assert_true(auth_patterns_match(&pats, "t-"));
	assert_false(auth_patterns_match(&pats, "t"));
	assert_false(auth_patterns_match(&pats, "T-17"));
	assert_true(auth_patterns_match(&pats, "x.1"));
	assert_false(auth_patterns_match(&pats, "x.10"));
	assert_false(auth_patterns_match(&pats, "x."));
	assert_true(auth_patterns_match(&pats, "gw:a:b"));
	assert_false(auth_patterns_match(&pats, ""));
	assert_false(auth_patterns_match(&pats, NULL));
	assert_false(auth_patterns_match(NULL, "t-1"));
	assert_false(auth_patterns_match(&none, "t-1"));
	assert_true(auth_patterns_match(&all, "t-1"));
	assert_true(auth_patterns_match(&all, "anything"));
}

static void test_principal_copy(void **state)
{
	auth_principal src = { 0 }, dst = { 0 };

	(void)state;
	assert_int_equal(roundtrip(JWT_ALG_HS256, AUTH_ALG_HS256, NULL,
				   "{\"sub\":\"gw-7\",\"exp\":9999999999,"
				   "\"scope\":[\"admin\"],"
				   "\"devices\":[\"a\",\"b*\"]}", &src), AUTH_OK);
	auth_principal_copy(&dst, &src);
	auth_principal_clear(&src);
	assert_string_equal(src.name, "");
	assert_string_equal(dst.name, "gw-7");
	assert_int_equal(dst.scopes, AUTH_SCOPE_ADMIN);
	assert_int_equal(dst.exp, 9999999999LL);
	assert_int_equal(dst.devices.n, 2);
	assert_true(auth_patterns_match(&dst.devices, "bcd"));
	assert_false(auth_patterns_match(&dst.devices, "ab"));
	auth_principal_clear(&dst);
	auth_principal_clear(NULL);
	assert_false(auth_has_scope(NULL, AUTH_SCOPE_ADMIN));
}

static void test_sha256_hex(void **state)
{
	char out[65];

	(void)state;
	auth_sha256_hex("", 0, out);
	assert_string_equal(out, "e3b0c44298fc1c149afbf4c8996fb924"
				 "27ae41e4649b934ca495991b7852b855");
	auth_sha256_hex("abc", 3, out);
	assert_string_equal(out, "ba7816bf8f01cfea414140de5dae2223"
				 "b00361a396177a9cb410ff61f20015ad");
}

static void test_strerror(void **state)
{
	(void)state;
	assert_int_equal(AUTH_OK, 0);
	assert_string_equal(auth_strerror(AUTH_OK), "ok");
	for (int r = AUTH_OK + 1; r < AUTH__COUNT; r++) {
		assert_true(r > 0);
		assert_non_null(auth_strerror((enum auth_result)r));
		assert_string_not_equal(auth_strerror((enum auth_result)r), "unknown auth result");
		assert_string_not_equal(auth_strerror((enum auth_result)r), "ok");
	}
	assert_string_equal(auth_strerror(AUTH__COUNT), "unknown auth result");
}

/* ---- optional timing ---------------------------------------------------- */

static double now_us(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec * 1e6 + (double)ts.tv_nsec / 1e3;
}

static void bench_one(const char *name, jwt_alg_t jalg, enum auth_jwt_alg alg,
		      int n)
{
	char *c = claimsf("{\"sub\":\"gw-1\",\"exp\":%lld,\"devices\":[\"t-*\"],"
			  "\"scope\":\"telemetry:read\"}", NOW + 600);
	char *t = mint(jalg, c);
	hub_auth *a = hub_for(alg, NULL);
	auth_principal p = { 0 };
	char *bad = strdup(t);
	double t0, t1, t2;

	bad[strlen(bad) - 3] ^= 1;
	t0 = now_us();
	for (int i = 0; i < n; i++) {
		assert_int_equal(verify_str(a, t, &p), AUTH_OK);
		auth_principal_clear(&p);
	}
	t1 = now_us();
	for (int i = 0; i < n; i++)
		assert_int_not_equal(verify_str(a, bad, NULL), AUTH_OK);
	t2 = now_us();
	print_message("bench %s: valid %.1f us/token, bad signature %.1f "
		      "us/token (%zu-byte token, n=%d)\n", name,
		      (t1 - t0) / n, (t2 - t1) / n, strlen(t), n);
	auth_free(a);
	free(t);
	free(bad);
	free(c);
}

static void test_bench(void **state)
{
	const char *env = getenv("HUB_AUTH_BENCH");
	int n = env ? atoi(env) : 0;

	(void)state;
	if (n <= 0)
		skip();
	bench_one("HS256", JWT_ALG_HS256, AUTH_ALG_HS256, n);
	bench_one("RS256", JWT_ALG_RS256, AUTH_ALG_RS256, n);
	bench_one("ES256", JWT_ALG_ES256, AUTH_ALG_ES256, n);
	{
		char h[65];
		char *path, *file;
		struct hub_opts o = { 0 };
		auth_principal p = { 0 };
		hub_auth *a;
		double t0;

		auth_sha256_hex("iotk_bench", 10, h);
		file = claimsf("[{\"name\":\"b\",\"sha256\":\"%s\","
			       "\"scopes\":[\"admin\"]}]", h);
		path = write_tmp(file);
		o.keys_file = path;
		a = hub_for(AUTH_ALG_HS256, &o);
		t0 = now_us();
		for (int i = 0; i < n; i++) {
			assert_int_equal(auth_check_api_key(a, "iotk_bench", 10,
							    &p), AUTH_OK);
			auth_principal_clear(&p);
		}
		print_message("bench api key (1 configured): %.2f us/key\n",
			      (now_us() - t0) / n);
		auth_free(a);
		unlink(path);
		free(path);
		free(file);
	}
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_valid_hs256),
		cmocka_unit_test(test_valid_rs256),
		cmocka_unit_test(test_valid_es256),
		cmocka_unit_test(test_es256_signature_is_jose),
		cmocka_unit_test(test_alg_none_refused),
		cmocka_unit_test(test_alg_confusion_refused),
		cmocka_unit_test(test_alg_mismatch_refused),
		cmocka_unit_test(test_wrong_signature),
		cmocka_unit_test(test_jwt_disabled_without_key),
		cmocka_unit_test(test_expired),
		cmocka_unit_test(test_exp_missing_or_not_integer),
		cmocka_unit_test(test_nbf),
		cmocka_unit_test(test_issuer),
		cmocka_unit_test(test_audience),
		cmocka_unit_test(test_issuer_and_audience_together),
		cmocka_unit_test(test_sub),
		cmocka_unit_test(test_devices_claim),
		cmocka_unit_test(test_scope_claim),
		cmocka_unit_test(test_length_cap),
		cmocka_unit_test(test_garbage),
		cmocka_unit_test(test_config_errors),
		cmocka_unit_test(test_api_keys_file_errors),
		cmocka_unit_test(test_api_keys_match),
		cmocka_unit_test(test_patterns),
		cmocka_unit_test(test_principal_copy),
		cmocka_unit_test(test_sha256_hex),
		cmocka_unit_test(test_strerror),
		cmocka_unit_test(test_bench),
	};

	return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
