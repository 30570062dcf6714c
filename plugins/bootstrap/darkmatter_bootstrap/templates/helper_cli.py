# The commands the /bootstrap shell script runs as `python - COMMAND ARGS` (after helper.py).
def _cli(cmd, args):
    if cmd == "sha256":
        print(sha256_file(args[0]))
    elif cmd == "fetch":
        fetch(args[0], args[1])
    elif cmd == "pick-port":
        try:
            port = pick_port(args[0], args[1])
        except ValueError as exc:
            sys.stderr.write("darkmatter-bootstrap: DARKMATTER_BOOTSTRAP_PORTS: %s\n" % exc)
            return 2
        if port is None:
            return 1
        print(port)
    elif cmd == "probe":
        agent = probe(args[0])
        if not agent:
            return 1
        print(agent)
    elif cmd == "alive":
        return 0 if alive(args[0]) else 1
    elif cmd == "launch":
        print(launch(*args))
    elif cmd == "wait":
        agent = wait_for(*args)
        if not agent:
            return 1
        print(agent)
    elif cmd == "tail":
        sys.stderr.write(tail(args[0]))
    elif cmd == "report":
        print(report(*args))
    else:
        return 2
    return 0


sys.exit(_cli(sys.argv[1], sys.argv[2:]))
