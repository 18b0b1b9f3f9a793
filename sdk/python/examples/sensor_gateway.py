"""A minimal gateway on iothub_gw (docs/sdk.md): reads a temperature from a
sensor file every interval (°C, or m°C as /sys/class/thermal/*/temp has it),
streams it as a thermostat's reading, and handles reboot, config (a setpoint)
and firmware_update (progress in steps of 20 %).

  python3 sensor_gateway.py URL TOKEN SPOOL_FILE DEVICE SENSOR_FILE [INTERVAL_S]
"""

import asyncio
import signal
import sys
import time

from iothub_gw import Gateway, SpoolFull


async def main(url, token, spool, device, sensor, interval=1.0):
    gw = Gateway(url, spool, token=token, fsync="batch",
                 on_reject=lambda seq, e, r: print("rejected:", e, file=sys.stderr),
                 on_state=lambda s, code, why: print("gateway", s, code, why, file=sys.stderr))
    state = {"setpoint": 21.0}
    gw.announce(device, "thermostat", {"example": "python"})

    @gw.command("reboot")
    async def reboot(cmd):
        print("reboot requested (%s): a real gateway would reboot after acking" % cmd.params)
        await cmd.succeeded()

    @gw.command("config")
    async def config(cmd):
        if not isinstance(cmd.params, dict) or "setpoint" not in cmd.params:
            await cmd.rejected("no setpoint")
            return
        state["setpoint"] = cmd.params["setpoint"]
        await cmd.succeeded({"setpoint": state["setpoint"]})

    @gw.command("firmware_update")
    async def firmware_update(cmd):
        for p in range(0, 100, 20):
            await cmd.in_progress(p, "downloading" if p == 0 else "installing")
            await asyncio.sleep(0.5)
        await cmd.succeeded({"version": cmd.params.get("version")})

    async def read_sensor():
        while True:
            try:
                with open(sensor) as f:
                    v = float(f.read().split()[0])
                gw.send(device, int(time.time() * 1000), {"temperature": v / 1000 if v > 1000 else v})
            except (OSError, ValueError, IndexError) as e:
                print("sensor:", e, file=sys.stderr)
            except SpoolFull as e:
                print("not accepted:", e, file=sys.stderr)
            await asyncio.sleep(interval)

    loop = asyncio.get_running_loop()
    for s in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(s, gw.stop)
    reader = asyncio.ensure_future(read_sensor())
    try:
        await gw.run()
    finally:
        reader.cancel()
        gw.close()   # what is not acked stays in the spool


if __name__ == "__main__":
    if len(sys.argv) < 6:
        sys.exit("usage: sensor_gateway.py URL TOKEN SPOOL_FILE DEVICE SENSOR_FILE [INTERVAL_S]")
    asyncio.run(main(*sys.argv[1:6], *(float(x) for x in sys.argv[6:7])))
