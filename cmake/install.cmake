# Install rules and the Debian package (CPack). docs/operations.md "Install".
#
#   cmake --install build [--prefix DIR]     binaries, tools, data, config, units
#   tools/make-deb [OUTDIR]                  the .deb (prefix /usr, /etc/iot-hub)
#
# Where things go (GNUInstallDirs; with the prefix /usr the config goes to
# /etc):
#   bin/                      iot-hub, iot-token, hubctl, gw-sim, dash-sub, iot-sink,
#                             iot-hub-migrate-layout
#   share/iot-hub/web         the browser dashboard
#   share/iot-hub/device-types  the example device types
#   SYSCONFDIR/iot-hub/iot-hub.conf   the config (a conffile in the package)
#   lib/systemd/system/       iot-hub.service, iot-hub@.service
#   share/doc/iot-hub/        operations.md, configuration.md
# The config and the units name those paths: they are rewritten here for the
# prefix being installed to (deploy/ holds the /usr versions).
include(GNUInstallDirs)

set(HUB_INSTALL_DATA ${CMAKE_INSTALL_FULL_DATADIR}/iot-hub)
set(HUB_INSTALL_ETC ${CMAKE_INSTALL_FULL_SYSCONFDIR}/iot-hub)
set(HUB_INSTALL_STATE ${CMAKE_INSTALL_FULL_LOCALSTATEDIR}/lib/iot-hub)
# With the prefix /usr the config goes to /etc (absolute); otherwise under the
# prefix, so that `cmake --install --prefix DIR` keeps everything in DIR. The
# paths written into the config and the units are those of the prefix given
# when configuring (-DCMAKE_INSTALL_PREFIX).
if(CMAKE_INSTALL_PREFIX STREQUAL "/usr")
  set(HUB_ETC_DEST ${HUB_INSTALL_ETC})
else()
  set(HUB_ETC_DEST ${CMAKE_INSTALL_SYSCONFDIR}/iot-hub)
endif()

# deploy/ files for this prefix: /usr/bin, /usr/share/iot-hub, /etc/iot-hub
# and /var/lib/iot-hub replaced by where this install puts them.
function(hub_install_rewrite src dst)
  file(READ ${src} text)
  string(REPLACE "/usr/share/iot-hub" "${HUB_INSTALL_DATA}" text "${text}")
  string(REPLACE "/usr/bin/iot-hub" "${CMAKE_INSTALL_FULL_BINDIR}/iot-hub" text "${text}")
  string(REPLACE "/usr/bin/iot-sink" "${CMAKE_INSTALL_FULL_BINDIR}/iot-sink" text "${text}")
  string(REPLACE "/etc/iot-hub" "${HUB_INSTALL_ETC}" text "${text}")
  string(REPLACE "/var/lib/iot-hub" "${HUB_INSTALL_STATE}" text "${text}")
  file(WRITE ${dst} "${text}")
  set_property(DIRECTORY APPEND PROPERTY CMAKE_CONFIGURE_DEPENDS ${src})
endfunction()

set(HUB_GEN ${PROJECT_BINARY_DIR}/install)
hub_install_rewrite(${PROJECT_SOURCE_DIR}/deploy/iot-hub.conf ${HUB_GEN}/iot-hub.conf)
hub_install_rewrite(${PROJECT_SOURCE_DIR}/deploy/iot-hub.service ${HUB_GEN}/iot-hub.service)
hub_install_rewrite(${PROJECT_SOURCE_DIR}/deploy/iot-hub@.service ${HUB_GEN}/iot-hub@.service)
hub_install_rewrite(${PROJECT_SOURCE_DIR}/deploy/iot-sink.service ${HUB_GEN}/iot-sink.service)

install(TARGETS iot-hub iot-token hubctl gw-sim dash-sub
        RUNTIME DESTINATION ${CMAKE_INSTALL_BINDIR})
install(PROGRAMS ${PROJECT_SOURCE_DIR}/tools/migrate-layout
        DESTINATION ${CMAKE_INSTALL_BINDIR} RENAME iot-hub-migrate-layout)
install(DIRECTORY ${PROJECT_SOURCE_DIR}/web/ DESTINATION ${CMAKE_INSTALL_DATADIR}/iot-hub/web
        PATTERN README.md EXCLUDE)
install(DIRECTORY ${PROJECT_SOURCE_DIR}/deploy/device-types/
        DESTINATION ${CMAKE_INSTALL_DATADIR}/iot-hub/device-types)
install(FILES ${HUB_GEN}/iot-hub.conf DESTINATION ${HUB_ETC_DEST})
install(FILES ${HUB_GEN}/iot-hub.service ${HUB_GEN}/iot-hub@.service
        DESTINATION lib/systemd/system)
# iot-sink (sink/, built when libpq is found): its unit and environment file.
if(TARGET iot-sink)
  install(TARGETS iot-sink RUNTIME DESTINATION ${CMAKE_INSTALL_BINDIR})
  install(FILES ${HUB_GEN}/iot-sink.service DESTINATION lib/systemd/system)
  install(FILES ${PROJECT_SOURCE_DIR}/deploy/iot-sink.env DESTINATION ${HUB_ETC_DEST})
  install(FILES ${PROJECT_SOURCE_DIR}/docs/sink.md DESTINATION ${CMAKE_INSTALL_DOCDIR})
endif()
install(FILES ${PROJECT_SOURCE_DIR}/docs/operations.md ${PROJECT_SOURCE_DIR}/docs/configuration.md
        DESTINATION ${CMAKE_INSTALL_DOCDIR})

# ---- the Debian package ---------------------------------------------------
# Built by tools/make-deb (a build with CMAKE_INSTALL_PREFIX=/usr, then
# `cpack -G DEB`). Depends come from dpkg-shlibdeps on the binaries.
set(CPACK_GENERATOR DEB)
set(CPACK_PACKAGE_NAME iot-hub)
set(CPACK_PACKAGE_VERSION ${PROJECT_VERSION})
set(CPACK_PACKAGE_CONTACT "iot-hub maintainers <iot-hub@localhost>")
set(CPACK_PACKAGE_DESCRIPTION_SUMMARY "WebSocket gateway hub for IoT fleets (Redis Streams)")
set(CPACK_PACKAGE_DESCRIPTION "Gateways stream telemetry over WebSocket; the hub authenticates them (JWT, optionally mTLS), validates readings against device-type schemas, stores them durably in Redis Streams and acknowledges each frame once stored. Dashboards subscribe to live readings and aggregates; operators send commands to devices.")
set(CPACK_PACKAGING_INSTALL_PREFIX ${CMAKE_INSTALL_PREFIX})
set(CPACK_DEBIAN_FILE_NAME DEB-DEFAULT)
set(CPACK_DEBIAN_PACKAGE_SECTION net)
set(CPACK_DEBIAN_PACKAGE_SHLIBDEPS ON)
# libwebsockets loads its libev event library at run time (dlopen): no
# shlibdeps sees it.
set(CPACK_DEBIAN_PACKAGE_DEPENDS "adduser, libwebsockets-evlib-ev")
set(CPACK_DEBIAN_PACKAGE_RECOMMENDS "redis-server (>= 5:7.0)")
set(CPACK_DEBIAN_PACKAGE_SUGGESTS "python3, postgresql")
set(CPACK_DEBIAN_PACKAGE_CONTROL_STRICT_PERMISSION ON)
configure_file(${PROJECT_SOURCE_DIR}/deploy/debian/conffiles.in ${HUB_GEN}/debian/conffiles @ONLY)
foreach(s postinst prerm postrm)
  configure_file(${PROJECT_SOURCE_DIR}/deploy/debian/${s} ${HUB_GEN}/debian/${s} COPYONLY)
endforeach()
set(CPACK_DEBIAN_PACKAGE_CONTROL_EXTRA
    ${HUB_GEN}/debian/conffiles ${HUB_GEN}/debian/postinst ${HUB_GEN}/debian/prerm
    ${HUB_GEN}/debian/postrm)
include(CPack)
