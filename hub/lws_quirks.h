/*
 * lws_quirks.h - workarounds for libwebsockets 4.1.6 behaviour its API gives
 * no handle on (hub/lws_quirks.c says why and how). Loop thread only.
 */
#ifndef HUB_LWS_QUIRKS_H
#define HUB_LWS_QUIRKS_H

#include <stddef.h>

/* The next socket shutdown lws performs (on this call stack) first writes
 * msg (at most 512 bytes, copied) to the peer. */
void hub_quirk_answer_next_close(const char *msg, size_t len);

/* Forgets an armed answer that no shutdown took. */
void hub_quirk_disarm(void);

#endif
