/*
 * opts.h - table-driven options, for the hub and every tool. A program (or
 * each subcommand of one) describes its options in one table: name, type,
 * the field of an options object it sets, default, bounds, help. The same
 * table then reads the command line (--key VALUE, --key=VALUE, -k), a config
 * file (`key value` lines), the environment, prints the --help lines and
 * dumps the values. Errors are one line, without the program's name.
 *
 * No libwebsockets here. Start-up code: it allocates, and reading a config
 * file blocks; not for lws callbacks. Not thread-safe (one parse at a time).
 */
#ifndef HUB_OPTS_H
#define HUB_OPTS_H

#include <stddef.h>
#include <stdio.h>

enum opt_type {
	OPT_STR,   /* char *, owned: copied when set, freed by opts_free() */
	OPT_INT,   /* int, an integer in [min, max] */
	OPT_LONG,  /* long, an integer in [min, max] */
	OPT_UINT,  /* unsigned, an integer in [min, max] (min >= 0) */
	OPT_U64,   /* uint64_t, decimal digits only, in [min, max] */
	OPT_DBL,   /* double, a number in [min, max] */
	OPT_FLAG,  /* int set to 1; takes no value */
};

struct opt;

/*
 * A row's own action, run after the value was checked and stored in its
 * field (for OPT_FLAG the field is set first too; a row with off
 * OPT_NO_FIELD has none). val is the text given (NULL for a flag). Returns
 * 0, or -1 with one line in err.
 */
typedef int (*opt_fn)(void *obj, const struct opt *o, const char *val,
		      char *err, size_t errlen);

#define OPT_NO_FIELD ((size_t)-1)

struct opt {
	const char *name;  /* "max-frame-bytes" (no dashes); NULL: a heading
			    * of the --help text, which is `help` */
	enum opt_type type;
	size_t off;        /* offsetof() the field in the options object */
	const char *def;   /* default, as a value's text; NULL: none */
	double min, max;   /* bounds of the numeric types */
	const char *help;  /* its --help text; "\n" goes on, indented */
	const char *meta;  /* the value's name in --help ("FILE"); NULL: none */
	char shortname;    /* -x alias (a letter), 0: none */
	opt_fn fn;         /* NULL: storing the value is all */
	const void *data;  /* anything fn wants (a JSON key, a limit, ...) */
};

/* Sets every field that has a default. Returns 0 or -1 with err. */
int opts_defaults(const struct opt *t, size_t n, void *obj, char *err, size_t errlen);

/* One table and the object its offsets point into. */
struct opts_tab {
	const struct opt *t;
	size_t n;
	void *obj;
};

/* A command line to parse. */
struct opts_cli {
	const struct opts_tab *tabs;  /* looked up in order: the first wins */
	size_t ntabs;
	/* A non-option argument: 0 to go on, 1 to stop parsing at it (it is
	 * left unread at *i), -1 with err to fail. NULL: every one is an
	 * error ("unexpected argument"). */
	int (*positional)(void *ctx, const char *arg, char *err, size_t errlen);
	void *ctx;
	/* where values come from, for their errors ("command line: x must
	 * be ..."); NULL: the flag ("--x must be ...") */
	const char *origin;
};

#define OPTS_HELP 2   /* opts_argv() met -h or --help */

/*
 * Parses argv[*i..argc): --name VALUE, --name=VALUE, -x VALUE, and bundled
 * short flags (-vv). A single '-' and, when no table has a short name,
 * anything starting with one '-' are positional. Returns 0 at the end,
 * 1 when positional() stopped it (*i at that argument), OPTS_HELP at -h or
 * --help (unless a table defines them), -1 with err.
 */
int opts_argv(const struct opts_cli *c, int argc, char **argv, int *i,
	      char *err, size_t errlen);

/* Applies PREFIX<KEY> environment variables (KEY: the name upper-cased, '-'
 * as '_'; an empty value unsets an OPT_STR). Returns 0 or -1 with err. */
int opts_env(const struct opt *t, size_t n, void *obj, const char *prefix,
	     char *err, size_t errlen);

/* Reads a config file of `key value` lines (also `key = value`, "value";
 * '#' comments, blank lines). Returns 0 or -1 with "FILE:LINE: ..." in err. */
int opts_load_file(const struct opt *t, size_t n, void *obj, const char *path,
		   char *err, size_t errlen);

/* The --help lines of the table: "  -x, --name META  help [default]". */
void opts_usage(const struct opt *t, size_t n, FILE *out);

/* Every option with its value as a config file ("# name (unset)" for an
 * unset string); headings and flags are left out. */
void opts_dump(const struct opt *t, size_t n, const void *obj, FILE *out);

/* Frees the table's OPT_STR fields and sets them NULL. */
void opts_free(const struct opt *t, size_t n, void *obj);

/* For programs' main(); these print and exit. PROG is the program's name. */

/* "PROG: <message> (see --help)" on stderr, then exit(2). */
void opts_die(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));

/* opts_argv(); at -h or --help usage(stdout) and exit(0); on an error
 * "PROG: <why>" on stderr and exit(2). Returns 0 or 1 as opts_argv(). */
int opts_argv_or_exit(const struct opts_cli *c, int argc, char **argv, int *i,
		      void (*usage)(FILE *out));

#endif
