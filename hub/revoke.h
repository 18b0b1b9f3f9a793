/*
 * revoke.h - revoking one gateway's credentials without rotating the key
 * for all (docs/operations.md "Revoking a gateway"). A revocation names a
 * token subject (`sub`: every token of that gateway) or one token (`jti`).
 * It is kept in Redis (HUB_KEY_REVOKED), announced on HUB_CH_REVOKED so that
 * every instance applies it at once, and held in memory by each instance,
 * which checks it at every gateway upgrade without a Redis round trip. Live
 * connections it covers are closed with 4401 (HUB_EV_REVOKED). Routes, admin
 * scope: POST /v1/revocations, GET /v1/revocations, DELETE
 * /v1/revocations/{sub|jti}/{value}.
 */
#ifndef HUB_REVOKE_H
#define HUB_REVOKE_H

#include <stdbool.h>

#include "hub/auth.h"

struct hub;

#define HUB_REVOKE_MAX 10000   /* revocations kept at most */

/* False until the list was read from Redis once. The hub starts listening
 * once it is (or when Redis stays unreachable past the start-up wait: then
 * the first read closes whatever it covers). */
bool hub_revocations_loaded(const struct hub *hub);

/* True when who's sub or jti is revoked (as this instance last heard). */
bool hub_revoked(const struct hub *hub, const auth_principal *who);

extern const struct hub_module hub_revoke_module;

#endif
