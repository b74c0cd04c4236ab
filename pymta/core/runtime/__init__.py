"""The child-side runtime shared by every service (Postfix's skeletons).

The master starts each service program with these file descriptors:

    fd 3   STATUS_FD    write end of the service's status pipe
    fd 4   LIFELINE_FD  read end of a pipe whose write end only the master
                        holds: it reads as EOF when the master is gone
    fd 5.. LISTEN_FD    the service's listening sockets (PYMTA_LISTEN_FDS of them)

and the arguments `-c config_dir -n service_name -t type [-o name=value]...
[-v]`.  The privilege drop happens in the master between fork and exec, so
no service code ever runs with more privilege than its master.cf line gives.
See docs/master-protocol.md.
"""

STATUS_FD = 3
LIFELINE_FD = 4
LISTEN_FD = 5

# Status records: struct "iIi" = pid, generation, status.
STATUS_FORMAT = "iIi"
STAT_TAKEN = 0      # at its connection cap (or leaving): do not count on it
STAT_AVAIL = 1      # can take more connections
STAT_USED = 2       # has served its first client (for start-up throttling)
