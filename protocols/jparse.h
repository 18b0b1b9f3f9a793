/*
 * jparse.h - a one-pass JSON parser that builds jansson values.
 *
 * jparse(buf, len, err) accepts exactly what jansson 2.14's
 * json_loadb(buf, len, JSON_REJECT_DUPLICATES, err) accepts and returns a
 * json_equal tree (reals bit-identical, integers stay integers), for a
 * fraction of the instructions: it is the gateway's hot path, where
 * jansson's byte-at-a-time lexer was most of the cost of a frame.
 *
 * Does not include libwebsockets.h; no global state of its own, so it may
 * be called from any callback.
 */
#ifndef HUB_JPARSE_H
#define HUB_JPARSE_H

#include <stddef.h>

#include <jansson.h>

/*
 * Parses the len bytes at buf (no NUL terminator needed; a NUL byte inside
 * is read like any other byte). The top level must be an object or array.
 *
 * Returns a new reference the caller releases with json_decref(); every
 * value is allocated through jansson, so json_set_alloc_funcs() hooks apply.
 * On error returns NULL and, when err is non-NULL, sets err->text to a short
 * reason (json_error_code() works on it), err->position to the 0-based byte
 * offset where the problem was found, err->line (1-based) and err->column
 * (1-based, in bytes) to where that offset is, and err->source to
 * "<buffer>". The texts are not jansson's; the accept/reject decision is.
 */
json_t *jparse(const char *buf, size_t len, json_error_t *err);

#endif
