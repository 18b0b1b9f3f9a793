/*
 * cmd_api.h - the commands rows of the operator API (CONTRACT §4,
 * docs/commands.md): create, get, cancel, list per device. Answers through
 * struct hub_req (hub/api.h); no lws here.
 */
#ifndef HUB_CMD_API_H
#define HUB_CMD_API_H

#include <stdbool.h>
#include <stddef.h>

#include "hub/api.h"

/* True for the paths below /v1/commands and /v1/devices/{device}/commands. */
bool cmd_api_handles(const char *path);

/* method is "GET" or "POST"; body (POST) is not NUL-terminated; idem is the
 * Idempotency-Key header or NULL. The key is authenticated; scopes are
 * checked here. */
void cmd_api_handle(struct hub_req *rq, const char *method, const char *path,
		    const struct hub_query *q, const char *body, size_t len,
		    const char *idem);

#endif
