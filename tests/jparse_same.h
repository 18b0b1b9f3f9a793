/* Test helper shared by tests/unit/test_jparse.c and
 * tests/fuzz/fuzz_jparse.c: is a jparse tree the same as jansson's? */
#ifndef HUB_TESTS_JPARSE_SAME_H
#define HUB_TESTS_JPARSE_SAME_H

#include <string.h>
#include <jansson.h>

/* 1 when a and b are the same tree. Recursion is bounded by the 2048 levels
 * both parsers allow. */
static inline int same(json_t *a, json_t *b)
{
	size_t i;
	void *ia, *ib;
	double x, y;

	if (json_typeof(a) != json_typeof(b))
		return 0;
	switch (json_typeof(a)) {
	case JSON_OBJECT:
		if (json_object_size(a) != json_object_size(b))
			return 0;
		ia = json_object_iter(a);
		ib = json_object_iter(b);
		for (; ia && ib; ia = json_object_iter_next(a, ia),
				 ib = json_object_iter_next(b, ib)) {
			size_t n = json_object_iter_key_len(ia);

			if (n != json_object_iter_key_len(ib) ||
			    memcmp(json_object_iter_key(ia),
				   json_object_iter_key(ib), n) ||
			    !same(json_object_iter_value(ia),
				  json_object_iter_value(ib)))
				return 0;
		}
		return !ia && !ib;
	case JSON_ARRAY:
		if (json_array_size(a) != json_array_size(b))
			return 0;
		for (i = 0; i < json_array_size(a); i++)
			if (!same(json_array_get(a, i), json_array_get(b, i)))
				return 0;
		return 1;
	case JSON_STRING:
		return json_string_length(a) == json_string_length(b) &&
		       !memcmp(json_string_value(a), json_string_value(b),
			       json_string_length(a));
	case JSON_INTEGER:
		return json_integer_value(a) == json_integer_value(b);
	case JSON_REAL:
		x = json_real_value(a);
		y = json_real_value(b);
		return !memcmp(&x, &y, sizeof(x));
	default:
		return 1;
	}
}

#endif
