# Embeds files in the hub as C arrays, at build time.
#
# One file (the OpenAPI document served by the hub):
#   cmake -DIN=<file> -DOUT=<file.c> -DNAME=<symbol> -P embed.cmake
#   -> const unsigned char <symbol>[] (NUL-terminated) and size_t <symbol>_len.
#
# The Redis scripts (docs/hacking.md "Redis scripts"):
#   cmake -DLUA_DIR=<hub/lua> -DOUT=<hub_lua.c> -DHEADER=<hub_lua.h> -P embed.cmake
#   -> for every <name>.lua of LUA_DIR, const char hub_lua_<name>[] (the
#   script's text, NUL-terminated), declared in HEADER with HUB_LUA_COUNT (how
#   many there are). Files whose name starts with '_' are libraries, not
#   scripts: a script line `--#include _<lib>.lua` is replaced by that file's
#   text (one level: a library includes nothing).

function(embed_hex path var)
  file(READ "${path}" hex HEX)
  string(REGEX REPLACE "([0-9a-f][0-9a-f])" "0x\\1," bytes "${hex}")
  set(${var} "${bytes}" PARENT_SCOPE)
endfunction()

if(DEFINED LUA_DIR)
  file(GLOB scripts RELATIVE "${LUA_DIR}" "${LUA_DIR}/*.lua")
  list(SORT scripts)
  get_filename_component(gen "${OUT}" DIRECTORY)
  set(c "/* Generated from ${LUA_DIR} by cmake/embed.cmake: the hub's Redis scripts. */\n")
  string(APPEND c "#include \"hub_lua.h\"\n")
  set(h "/* Generated from ${LUA_DIR} by cmake/embed.cmake: the hub's Redis scripts,\n")
  string(APPEND h " * one per file of hub/lua/ (each file's first comment is its contract). */\n")
  string(APPEND h "#ifndef HUB_LUA_H\n#define HUB_LUA_H\n\n")
  set(count 0)
  foreach(f ${scripts})
    if(f MATCHES "^_")
      continue()
    endif()
    if(NOT f MATCHES "^([a-z0-9_]+)\\.lua$")
      message(FATAL_ERROR "hub/lua/${f}: a script's name is [a-z0-9_]+.lua")
    endif()
    set(name "${CMAKE_MATCH_1}")
    file(READ "${LUA_DIR}/${f}" text)
    string(REGEX MATCHALL "--#include [^\n]*" incs "${text}")
    foreach(inc ${incs})
      string(REGEX REPLACE "^--#include " "" lib "${inc}")
      if(NOT lib MATCHES "^_[a-z0-9_]+\\.lua$" OR NOT EXISTS "${LUA_DIR}/${lib}")
        message(FATAL_ERROR "hub/lua/${f}: no library '${lib}' to include")
      endif()
      file(READ "${LUA_DIR}/${lib}" libtext)
      string(REPLACE "${inc}\n" "${libtext}" text "${text}")
    endforeach()
    file(WRITE "${gen}/lua/${f}" "${text}")
    embed_hex("${gen}/lua/${f}" bytes)
    string(APPEND c "const char hub_lua_${name}[] = {${bytes} 0};\n")
    string(APPEND h "extern const char hub_lua_${name}[];\n")
    math(EXPR count "${count} + 1")
  endforeach()
  string(APPEND h "\n#define HUB_LUA_COUNT ${count}\n\n#endif\n")
  file(WRITE "${OUT}" "${c}")
  # The header only when it changed: every module that calls a script
  # includes it.
  file(WRITE "${HEADER}.new" "${h}")
  configure_file("${HEADER}.new" "${HEADER}" COPYONLY)
  file(REMOVE "${HEADER}.new")
  return()
endif()

embed_hex("${IN}" bytes)
file(READ "${IN}" hex HEX)
string(LENGTH "${hex}" n)
math(EXPR n "${n} / 2")
file(WRITE "${OUT}"
  "/* Generated from ${IN} by cmake/embed.cmake. */\n"
  "#include <stddef.h>\n"
  "const unsigned char ${NAME}[] = {${bytes} 0};\n"
  "const size_t ${NAME}_len = ${n};\n")
