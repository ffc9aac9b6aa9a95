# Test workload driven line by line on stdin; answers one line on stdout per command.
# Prints "ready" once the interpreter runs (after any exec a launcher such as pyenv does).
# Commands:
#   connect HOST PORT [--v6] [--mark M] [--bind SRCIP]  -> "ok LOCALPORT" | "err ERRNO" | "err timeout"
#   connect_many N HOST PORT                            -> "done OK EPERM OTHER"
#   listen HOST PORT                                    -> "listening PORT"; later "accepted PEER"
#   exec PROGRAM ARGS...                                -> replaces the process (same pid)
#   user UID                                            -> "user UID" after dropping root
#   mark M                                              -> "mark ok" | "mark err ERRNO"
import os, socket, sys, threading

conns = []

def family_of(host, v6):
    return socket.AF_INET6 if v6 or ":" in host else socket.AF_INET

def connect(args):
    host, port = args[0], int(args[1])
    opts = args[2:]
    fam = family_of(host, "--v6" in opts)
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.settimeout(2)
    try:
        if "--mark" in opts:
            s.setsockopt(socket.SOL_SOCKET, 36, int(opts[opts.index("--mark") + 1], 0))
        if "--bind" in opts:
            s.bind((opts[opts.index("--bind") + 1], 0))
        s.connect((host, port))
        conns.append(s)
        return "ok %d" % s.getsockname()[1]
    except socket.timeout:
        return "err timeout"
    except OSError as e:
        return "err %d" % e.errno

def connect_many(args):
    n, host, port = int(args[0]), args[1], int(args[2])
    ok = eperm = other = 0
    for _ in range(n):
        s = socket.socket(family_of(host, False), socket.SOCK_STREAM)
        s.settimeout(2)
        try:
            s.connect((host, port))
            ok += 1
        except OSError as e:
            if e.errno == 1:
                eperm += 1
            else:
                other += 1
        finally:
            s.close()
    return "done %d %d %d" % (ok, eperm, other)

def serve(listener):
    while True:
        c, peer = listener.accept()
        conns.append(c)
        print("accepted %s %d" % (peer[0], peer[1]), flush=True)

def listen(args):
    host, port = args[0], int(args[1])
    s = socket.socket(family_of(host, False), socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, port))
    s.listen(64)
    threading.Thread(target=serve, args=(s,), daemon=True).start()
    return "listening %d" % s.getsockname()[1]

def mark(args):
    s = socket.socket()
    try:
        s.setsockopt(socket.SOL_SOCKET, 36, int(args[0], 0))
        return "mark ok"
    except OSError as e:
        return "mark err %d" % e.errno

def user(args):
    uid = int(args[0])
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
    return "user %d" % os.geteuid()

print("ready", flush=True)
for line in sys.stdin:
    words = line.split()
    if not words:
        continue
    cmd, args = words[0], words[1:]
    if cmd == "exec":
        sys.stdout.flush()
        os.execvp(args[0], args)
    handler = {"connect": connect, "connect_many": connect_many, "listen": listen,
               "mark": mark, "user": user}.get(cmd)
    print(handler(args) if handler else "unknown %s" % cmd, flush=True)
