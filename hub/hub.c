/*
 * hub.c - loading (and reloading on SIGHUP) what the hub is configured
 * with: the device types and the API keys and JWT key.
 */
#include "hub/hub.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "hub/log.h"
#include "hub/util.h"

static int load_jwt_key(struct hub *hub, char **key, size_t *len, char *err, size_t errlen)
{
	if (!hub->cfg.jwt_key) {
		*key = NULL;
		*len = 0;
		return 0;
	}
	*key = hub_read_file(hub->cfg.jwt_key, 65536, len);
	if (!*key) {
		snprintf(err, errlen, "jwt-key %s: %s", hub->cfg.jwt_key, strerror(errno));
		return -1;
	}
	/* A secret file usually ends with a newline that is not part of it. */
	if (!strcmp(hub->cfg.jwt_alg, "HS256"))
		while (*len && ((*key)[*len - 1] == '\n' || (*key)[*len - 1] == '\r'))
			(*key)[--*len] = '\0';
	return 0;
}

int hub_reload(struct hub *hub, bool initial)
{
	char err[512] = "";
	schema_set *set;
	hub_auth *auth;
	char *key = NULL;
	size_t keylen = 0;

	set = schema_set_load_dir(hub->cfg.schemas, err, sizeof(err));
	if (!set)
		goto fail;
	if (!schema_set_count(set)) {
		snprintf(err, sizeof(err), "schemas %s: no device types found", hub->cfg.schemas);
		schema_set_free(set);
		set = NULL;
		goto fail;
	}
	if (hub->jwt_ephemeral) {
		key = hub_xmalloc(hub->jwt_key_len + 1);
		memcpy(key, hub->jwt_key, hub->jwt_key_len + 1);
		keylen = hub->jwt_key_len;
	} else if (load_jwt_key(hub, &key, &keylen, err, sizeof(err))) {
		goto fail;
	}
	auth_config ac = {
		.alg = !strcmp(hub->cfg.jwt_alg, "RS256") ? AUTH_ALG_RS256 :
		       !strcmp(hub->cfg.jwt_alg, "ES256") ? AUTH_ALG_ES256 : AUTH_ALG_HS256,
		.jwt_key = key,
		.jwt_key_len = keylen,
		.issuer = hub->cfg.jwt_issuer,
		.audience = hub->cfg.jwt_audience,
		.leeway_s = hub->cfg.jwt_leeway_s,
		.api_keys_file = hub->cfg.api_keys,
	};
	auth = auth_new(&ac, err, sizeof(err));
	if (!auth)
		goto fail;

	schema_set_free(hub->schemas);
	hub->schemas = set;
	hub->schemas_gen++;
	auth_free(hub->auth);
	hub->auth = auth;
	free(hub->jwt_key);
	hub->jwt_key = key;
	hub->jwt_key_len = keylen;
	if (!initial)
		hub_info("reloaded %zu device types from %s", schema_set_count(set),
			 hub->cfg.schemas);
	return 0;

fail:
	schema_set_free(set);
	free(key);
	if (initial)
		fprintf(stderr, "iot-hub: %s\n", err);
	else
		hub_err("reload failed, keeping the previous configuration: %s", err);
	return -1;
}
