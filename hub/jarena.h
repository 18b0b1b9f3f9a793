/*
 * jarena.h - a bump allocator for jansson, for documents that live exactly
 * as long as one message is handled (the gateway's telemetry frames).
 *
 * Parsing a 100-reading frame makes ~700 small jansson allocations (an
 * object, its hash table, a pair per key, a value per field) that all die
 * together a few microseconds later; malloc and free were ~15 % of the hub's
 * CPU at that batch size. Between hub_jarena_begin() and hub_jarena_end(),
 * jansson allocates from one reused block; freeing such memory is a no-op
 * and the block is reused at the next begin. Outside that window, and for
 * what does not fit, it is malloc/free as usual, so jansson memory from
 * anywhere else (libjwt, the HTTP API) is untouched.
 *
 * The rule: a document parsed inside the window must be released (decref)
 * before the next begin. begin checks it: if anything is still live, the
 * block is abandoned to its holders (not reused) and counted in
 * hub_jarena_abandoned; never reused under a live document.
 */
#ifndef HUB_JARENA_H
#define HUB_JARENA_H

#include <stddef.h>

/* Installs the allocator into jansson (once, before the loop runs). */
void hub_jarena_install(void);

void hub_jarena_begin(void);
void hub_jarena_end(void);

extern size_t hub_jarena_abandoned;

#endif
