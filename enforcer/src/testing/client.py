# Test workload driven line by line on stdin; answers one line on stdout per command.
# Prints "ready" once the interpreter runs (after any exec a launcher such as pyenv does).
# Commands:
#   connect HOST PORT [--v6] [--mark M] [--bind SRCIP] [--send DATA] [--inherit]
#                                                       -> "ok LOCALPORT" | "err ERRNO"
#                                                          | "err timeout LOCALPORT"
#                                                          (--send: DATA, `_` for spaces, then a
#                                                          blank line; --inherit: the socket
#                                                          survives exec)
#   connect_many N HOST PORT                            -> "done OK EPERM OTHER"
#   listen HOST PORT [--reuseport] [--inherit] [--freebind]
#                                                       -> "listening PORT"; later "accepted PEER"
#                                                          (--inherit: the listener survives exec;
#                                                          --freebind: HOST need not be local)
#   bind HOST PORT                                      -> "bound PORT" | "err ERRNO" (no listen)
#   listen_unbound                                      -> "listening PORT" (listen() without bind:
#                                                          the kernel chooses the port)
#   close_listeners                                     -> "closed N pending M" (M: connections
#                                                          still queued, never accepted)
#   socket                                              -> "socket FD" (an unconnected TCP socket)
#   connect_fd FD HOST PORT                             -> like connect, on socket FD
#   udp_send HOST PORT                                  -> "ok" | "err ERRNO" (sendto, unconnected)
#   udp_connect HOST PORT                               -> "ok" | "err ERRNO"
#   udp_listen HOST PORT                                -> "udp PORT"; later "datagram PEER DATA"
#   ping HOST                                           -> "ok" | "err ERRNO" (ICMP echo, ping socket)
#   raw                                                 -> "ok" | "err ERRNO" (an IPv4 raw socket)
#   tcp                                                 -> "ok" | "err ERRNO" (an IPv4 TCP socket)
#   mptcp                                               -> "ok" | "err ERRNO" (an IPv4 MPTCP socket)
#   unshare_net                                         -> "ok" | "err ERRNO" (a new network namespace)
#   packet                                              -> "ok" | "err ERRNO" (an AF_PACKET socket)
#   exec PROGRAM ARGS...                                -> replaces the process (same pid)
#   mark M                                              -> "mark ok" | "mark err ERRNO"
#   send DATA                                           -> "ok" | "err ERRNO" (on the last
#                                                          connection made by connect)
import ctypes, os, socket, sys, threading

conns = []
listeners = []
sockets = {}

def family_of(host, v6):
    return socket.AF_INET6 if v6 or ":" in host else socket.AF_INET

def connect_on(s, host, port, opts):
    s.settimeout(2)
    try:
        if "--mark" in opts:
            s.setsockopt(socket.SOL_SOCKET, 36, int(opts[opts.index("--mark") + 1], 0))
        if "--bind" in opts:
            s.bind((opts[opts.index("--bind") + 1], 0))
        s.connect((host, port))
        if "--send" in opts:
            s.sendall(opts[opts.index("--send") + 1].replace("_", " ").encode() + b"\r\n\r\n")
        if "--inherit" in opts:
            s.set_inheritable(True)
        conns.append(s)
        return "ok %d" % s.getsockname()[1]
    except socket.timeout:
        return "err timeout %d" % s.getsockname()[1]
    except OSError as e:
        return "err %d" % e.errno

def connect(args):
    host, port = args[0], int(args[1])
    opts = args[2:]
    return connect_on(socket.socket(family_of(host, "--v6" in opts), socket.SOCK_STREAM), host, port, opts)

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
        try:
            c, peer = listener.accept()
        except OSError:
            return
        conns.append(c)
        print("accepted %s %d" % (peer[0], peer[1]), flush=True)

def start_listening(s):
    s.listen(64)
    listeners.append(s)
    threading.Thread(target=serve, args=(s,), daemon=True).start()
    return "listening %d" % s.getsockname()[1]

def listen(args):
    host, port = args[0], int(args[1])
    s = socket.socket(family_of(host, False), socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if "--reuseport" in args[2:]:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    if "--inherit" in args[2:]:
        s.set_inheritable(True)
    if "--freebind" in args[2:]:
        s.setsockopt(socket.IPPROTO_IP, 15, 1)
    s.bind((host, port))
    return start_listening(s)

def bind(args):
    host, port = args[0], int(args[1])
    s = socket.socket(family_of(host, False), socket.SOCK_STREAM)
    try:
        s.bind((host, port))
    except OSError as e:
        return "err %d" % e.errno
    conns.append(s)
    return "bound %d" % s.getsockname()[1]

def listen_unbound(args):
    return start_listening(socket.socket(socket.AF_INET, socket.SOCK_STREAM))

def queued(listener):
    # tcpi_unacked (offset 24 of struct tcp_info) of a listener is its accept queue's length.
    info = listener.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 32)
    return int.from_bytes(info[24:28], sys.byteorder)

def close_listeners(args):
    n = len(listeners)
    pending = sum(queued(s) for s in listeners)
    for s in listeners:
        # shutdown wakes the thread blocked in accept(), which would keep the socket open.
        s.shutdown(socket.SHUT_RDWR)
        s.close()
    listeners.clear()
    return "closed %d pending %d" % (n, pending)

def new_socket(args):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sockets[s.fileno()] = s
    return "socket %d" % s.fileno()

def connect_fd(args):
    return connect_on(sockets.pop(int(args[0])), args[1], int(args[2]), args[3:])

def errno_of(action):
    try:
        action()
        return "ok"
    except OSError as e:
        return "err %d" % e.errno

def send(args):
    return errno_of(lambda: conns[-1].sendall(args[0].encode()))

def udp_send(args):
    host, port = args[0], int(args[1])
    s = socket.socket(family_of(host, False), socket.SOCK_DGRAM)
    conns.append(s)
    return errno_of(lambda: s.sendto(b"hello", (host, port)))

def udp_connect(args):
    host, port = args[0], int(args[1])
    s = socket.socket(family_of(host, False), socket.SOCK_DGRAM)
    conns.append(s)
    return errno_of(lambda: s.connect((host, port)))

def receive(s):
    while True:
        try:
            data, peer = s.recvfrom(2048)
        except OSError:
            return
        print("datagram %s %s" % (peer[0], data.decode(errors="replace")), flush=True)

def udp_listen(args):
    host, port = args[0], int(args[1])
    s = socket.socket(family_of(host, False), socket.SOCK_DGRAM)
    s.bind((host, port))
    conns.append(s)
    threading.Thread(target=receive, args=(s,), daemon=True).start()
    return "udp %d" % s.getsockname()[1]

def ping(args):
    def echo():
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP)
        conns.append(s)
        s.sendto(b"\x08\x00\x00\x00\x00\x01\x00\x01", (args[0], 0))
    return errno_of(echo)

def raw(args):
    return errno_of(lambda: conns.append(socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)))

def tcp(args):
    return errno_of(lambda: conns.append(socket.socket(socket.AF_INET, socket.SOCK_STREAM)))

def mptcp(args):
    return errno_of(lambda: conns.append(socket.socket(socket.AF_INET, socket.SOCK_STREAM, 262)))

def unshare_net(args):
    # CLONE_NEWNET, through libc: os.unshare needs Python 3.12.
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(0x40000000) == 0:
        return "ok"
    return "err %d" % ctypes.get_errno()

def packet(args):
    return errno_of(lambda: conns.append(socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0x0300)))

def mark(args):
    s = socket.socket()
    try:
        s.setsockopt(socket.SOL_SOCKET, 36, int(args[0], 0))
        return "mark ok"
    except OSError as e:
        return "mark err %d" % e.errno

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
               "bind": bind, "listen_unbound": listen_unbound, "close_listeners": close_listeners,
               "socket": new_socket, "connect_fd": connect_fd, "udp_send": udp_send, "send": send,
               "udp_connect": udp_connect, "udp_listen": udp_listen, "ping": ping, "raw": raw,
               "packet": packet, "mark": mark, "tcp": tcp, "mptcp": mptcp,
               "unshare_net": unshare_net}.get(cmd)
    print(handler(args) if handler else "unknown %s" % cmd, flush=True)
