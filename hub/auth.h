/*
 * auth.h - gateway JWTs, API keys and device patterns.
 *
 * JWT verification pins the configured algorithm (libjwt 1.10.2 accepts
 * whatever alg the token names, none included: docs/pitfalls.md) and checks
 * every claim itself, since libjwt checks none: exp (required, integer), nbf,
 * iss and aud when configured. API keys are kept only as SHA-256 hashes and
 * compared in constant time. No libwebsockets here; every function is cheap
 * enough for an lws callback except auth_new().
 */
#ifndef HUB_AUTH_H
#define HUB_AUTH_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef struct hub_auth hub_auth;

enum auth_scope {
	AUTH_SCOPE_TELEMETRY_READ = 1u << 0, /* "telemetry:read" */
	AUTH_SCOPE_COMMANDS_WRITE = 1u << 1, /* "commands:write" */
	AUTH_SCOPE_ADMIN          = 1u << 2, /* "admin": implies every scope */
};

enum auth_jwt_alg { AUTH_ALG_HS256, AUTH_ALG_RS256, AUTH_ALG_ES256 };

/* Device-id patterns: an exact id, or a prefix ending in '*' ("*" = all). */
typedef struct auth_patterns {
	char **items;
	size_t n;
	bool all;      /* no restriction (API key without "devices", or "*") */
} auth_patterns;

/* Who a verified token or key speaks for. Owns its strings. */
typedef struct auth_principal {
	char name[129];         /* JWT sub, or the API key's name */
	unsigned scopes;        /* enum auth_scope bits */
	auth_patterns devices;  /* JWT `devices` claim or the key's "devices" */
	int64_t exp;            /* JWT exp (seconds), 0 for API keys */
	bool has_devices_claim; /* JWT: the `devices` claim was present */
	bool is_api_key;
} auth_principal;

typedef struct auth_config {
	enum auth_jwt_alg alg;
	const char *jwt_key;       /* HS256 secret bytes or PEM public key */
	size_t jwt_key_len;
	const char *issuer;        /* NULL: not checked */
	const char *audience;      /* NULL: not checked */
	int leeway_s;              /* tolerance for exp/nbf */
	const char *api_keys_file; /* NULL: no API keys */
} auth_config;

/* Builds the verifier. Reads api_keys_file (JSON array of {"name","sha256",
 * "scopes":[...],"devices":[...]}); copies everything it keeps. Returns NULL
 * with a one-line reason in err. Free with auth_free() (NULL-safe). */
hub_auth *auth_new(const auth_config *cfg, char *err, size_t errlen);
void auth_free(hub_auth *a);

enum auth_result {
	AUTH_OK = 0,
	AUTH_ERR_MALFORMED = -1,   /* not a JWT / undecodable */
	AUTH_ERR_ALG = -2,         /* alg differs from the pinned one (incl. none) */
	AUTH_ERR_SIGNATURE = -3,
	AUTH_ERR_EXPIRED = -4,     /* exp missing, not an integer, or past */
	AUTH_ERR_NOT_YET = -5,     /* nbf in the future */
	AUTH_ERR_ISSUER = -6,
	AUTH_ERR_AUDIENCE = -7,
	AUTH_ERR_CLAIMS = -8,      /* sub missing/invalid, devices not an array of strings, ... */
	AUTH_ERR_UNKNOWN_KEY = -9, /* API key not configured */
};

/* Short static description of an auth_result. */
const char *auth_strerror(int rc);

/* Verifies a compact JWT (token[0..len), not NUL-terminated) at time now_s.
 * On AUTH_OK fills *out (caller must auth_principal_clear it): name = sub,
 * devices = `devices` claim (absent: no devices), scopes from the `scope`
 * claim (space-separated string or array of strings). */
int auth_verify_jwt(const hub_auth *a, const char *token, size_t len,
		    int64_t now_s, auth_principal *out);

/* Looks an API key up by the SHA-256 of its bytes. On AUTH_OK fills *out
 * (devices.all when the key has no "devices"). */
int auth_check_api_key(const hub_auth *a, const char *key, size_t len,
		       auth_principal *out);

/* Releases what a principal owns; leaves it zeroed. NULL-safe. */
void auth_principal_clear(auth_principal *p);

/* Deep copy; returns 0, or -1 on allocation failure. */
int auth_principal_copy(auth_principal *dst, const auth_principal *src);

/* True if the principal has the scope (admin has all). */
bool auth_has_scope(const auth_principal *p, unsigned scope);

/* True if device (NUL-terminated) matches one of the patterns. */
bool auth_patterns_match(const auth_patterns *pats, const char *device);

/* Lower-case hex SHA-256 of data into out[65]. */
void auth_sha256_hex(const void *data, size_t len, char out[65]);

#endif
