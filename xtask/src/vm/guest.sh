#!/bin/sh
# PID 1 of a vm-test guest (busybox sh). Loads the netfilter modules, builds a client, a NAT router
# and a server in network namespaces (no link leaves the guest), then, once per capture source,
# runs the agent on the router with `conntrack -E` beside it as witness while three rounds of
# connections are made and ended: by expiry, by `conntrack -D`, by `conntrack -F`. Every result is
# printed on the console as `AKSVM <kind> <source> <text>` for xtask to compare; the guest judges
# nothing itself.
export PATH=/bin:/sbin
# Debian's busybox shell runs its own applets before PATH: iproute2's ip is needed for netns.
ip() { /bin/ip "$@"; }
say() { echo "AKSVM $*"; }
# Seconds since boot, to see where a guest spends its time.
now() { cut -d' ' -f1 /proc/uptime; }
die() {
	say "abort $*"
	poweroff -f
}
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs run /run
mount -t tmpfs tmp /tmp
mkdir -p /run/netns
say kernel "$(uname -r)"

# $1: links (veth) or netfilter, each list in dependency order. The netfilter ones are loaded
# after the first agent starts, as on a node where kube-proxy loads them later.
load_modules() {
	for m in $(cat /modules.$1); do
		insmod "/modules/$m.ko" || die "insmod $m failed"
	done
}

rt() { ip netns exec rt "$@"; }

links() {
	load_modules links
	ip link set lo up
	for ns in cl rt sv; do
		ip netns add $ns || die "ip netns add $ns failed"
		ip -n $ns link set lo up
	done
	# cl plays the internet (RFC 5737 and RFC 3849 addresses), sv a pod behind the router.
	ip link add c0 netns cl type veth peer name r0 netns rt || die "veth c0/r0 failed"
	ip link add s0 netns sv type veth peer name r1 netns rt || die "veth s0/r1 failed"
	ip -n cl addr add 203.0.113.10/24 dev c0
	# The internet server's addresses on lo, so that clients send from c0's.
	ip -n cl addr add 198.51.100.20/32 dev lo
	ip -n cl addr add 2001:db8:1::10/64 dev c0 nodad
	ip -n cl addr add 2001:db8:2::20/128 dev lo
	ip -n rt addr add 203.0.113.1/24 dev r0
	ip -n rt addr add 2001:db8:1::1/64 dev r0 nodad
	ip -n rt addr add 10.0.0.1/24 dev r1
	ip -n rt addr add fd00::1/64 dev r1 nodad
	ip -n sv addr add 10.0.0.10/24 dev s0
	ip -n sv addr add fd00::10/64 dev s0 nodad
	for l in cl:c0 rt:r0 rt:r1 sv:s0; do ip -n ${l%:*} link set ${l#*:} up; done
	ip -n cl route add default via 203.0.113.1
	ip -n cl -6 route add default via 2001:db8:1::1
	ip -n sv route add default via 10.0.0.1
	ip -n sv -6 route add default via fd00::1
	ip -n rt route add 198.51.100.0/24 via 203.0.113.10
	ip -n rt -6 route add 2001:db8:2::/64 via 2001:db8:1::10
	rt sysctl -qw net.ipv4.ip_forward=1
	rt sysctl -qw net.ipv6.conf.all.forwarding=1
}

nat() {
	load_modules netfilter
	# DNAT: frontend .10 to the pod; both: frontend .11 to the pod, MASQUERADEd towards it;
	# SNAT: the pod to the internet, MASQUERADEd to the router's address.
	for fam in "iptables 192.0.2.10 192.0.2.11 10.0.0.10:8080 10.0.0.0/24" \
		"ip6tables 2001:db8:ff::10 2001:db8:ff::11 [fd00::10]:8080 fd00::/64"; do
		set -- $fam
		for p in tcp udp; do
			for frontend in $2 $3; do
				rt $1 -t nat -A PREROUTING -p $p -d $frontend -j DNAT --to-destination $4 ||
					die "$1 DNAT failed"
			done
		done
		rt $1 -t nat -A POSTROUTING -o r1 -m conntrack --ctorigdst $3 -j MASQUERADE ||
			die "$1 MASQUERADE towards the pod failed"
		rt $1 -t nat -A POSTROUTING -o r0 -s $5 -j MASQUERADE ||
			die "$1 MASQUERADE towards the internet failed"
	done
	# Echo servers: the pod for DNAT, the internet server for SNAT.
	for l in "sv 10.0.0.10 fd00::10 8080" "cl 198.51.100.20 2001:db8:2::20 80"; do
		set -- $l
		ip netns exec $1 socat TCP4-LISTEN:$4,bind=$2,fork,reuseaddr EXEC:cat &
		ip netns exec $1 socat TCP6-LISTEN:$4,bind=[$3],fork,reuseaddr,ipv6only=1 EXEC:cat &
		ip netns exec $1 socat -T2 UDP4-RECVFROM:$4,bind=$2,fork EXEC:cat &
		ip netns exec $1 socat -T2 UDP6-RECVFROM:$4,bind=[$3],fork,ipv6only=1 EXEC:cat &
	done
	sleep 1
}

# One connection: proto, client namespace, destination, source port. The source port names the
# run and the round (UR0NN: run U, round R) so that xtask can tell how each connection ended, and
# no run reuses a port another run's client socket may still hold in TIME_WAIT.
connect() {
	echo ping | ip netns exec $2 timeout 5 socat -t0.5 - "$1:$3,sourceport=$4" >/dev/null 2>&1 ||
		say note "connection $1 $3 from port $4 got no answer"
}

# Twelve connections: DNAT, SNAT, both; TCP and UDP; IPv4 and IPv6. With $1 = delete, each is
# deleted with `conntrack -D` once made (by its source port: other rounds' entries stay).
round() {
	mode=$1
	n=0
	for p in TCP UDP; do
		for t in "cl 192.0.2.10:80" "cl 192.0.2.11:80" "sv 198.51.100.20:80" \
			"cl [2001:db8:ff::10]:80" "cl [2001:db8:ff::11]:80" "sv [2001:db8:2::20]:80"; do
			set -- $t
			case $2 in \[*) v=6 ;; *) v=4 ;; esac
			port=$((20000 + run_no * 10000 + round_no * 1000 + n))
			connect $p$v $1 $2 $port
			if [ "$mode" = delete ]; then
				rt conntrack -D -f ipv$v -p $p --orig-port-src $port >/dev/null 2>&1 ||
					say note "conntrack -D of the connection from port $port failed"
			fi
			n=$((n + 1))
		done
	done
}

# Waits (at most $2 seconds) until the witness has seen $1 DESTROY events.
wait_destroys() {
	i=0
	while [ "$(grep -c DESTROY /tmp/witness.$source)" -lt "$1" ] && [ $i -lt $(($2 * 2)) ]; do
		sleep 0.5
		i=$((i + 1))
	done
}

# Waits (at most $2 seconds) for the running agent to log $1.
wait_log() {
	i=0
	until grep -q "$1" $log 2>/dev/null; do
		i=$((i + 1))
		if [ $i -gt $(($2 * 2)) ] || ! kill -0 $agent 2>/dev/null; then
			say note "the agent did not log \"$1\""
			return
		fi
		sleep 0.5
	done
}

timeouts() {
	for t in tcp_timeout_time_wait tcp_timeout_close tcp_timeout_fin_wait tcp_timeout_close_wait \
		tcp_timeout_last_ack udp_timeout udp_timeout_stream; do
		rt sysctl -qw net.netfilter.nf_conntrack_$t=$1
	done
}

# One capture source: agent and witness on the router, three rounds, then both outputs.
check() {
	source=$1
	# Files of this run only: a reader racing the redirection must not find the last run's.
	log=/tmp/agent.$source.err
	/bin/aksnet-agent --dump --output json --show-ends --netns rt --source $source \
		--config /etc/aksnet.toml >/tmp/agent.$source.out 2>$log &
	agent=$!
	if [ "$late" = 1 ]; then
		wait_log "attaches once it is loaded" 60
		say step "$(now)s $source: loading nf_conntrack after the agent started"
		nat
		wait_log "the eBPF capture is attached" 60
	fi
	wait_log "capturing conntrack NAT" 60
	# Settle: the agent's first events must not race the witness's start.
	sleep 2
	# Not through rt(): a background function is a subshell, and $! must be conntrack itself.
	/bin/ip netns exec rt conntrack -E -e NEW,DESTROY >/tmp/witness.$source 2>/tmp/witness.$source.err &
	witness=$!
	sleep 1
	# Round 1's connections expire while round 2 runs; round 3's flush comes once they have.
	say step "$(now)s $source: agent up, round 1 (ends by expiry)"
	timeouts 2
	round_no=1
	round
	timeouts 120
	say step "$(now)s $source: round 2 (ends by conntrack -D)"
	round_no=2
	round delete
	wait_destroys 24 90
	say step "$(now)s $source: round 3 (ends by conntrack -F)"
	round_no=3
	round
	rt conntrack -F -f ipv4 >/dev/null 2>&1
	rt conntrack -F -f ipv6 >/dev/null 2>&1
	wait_destroys 36 10
	sleep 2
	kill -TERM $agent 2>/dev/null
	i=0
	while kill -0 $agent 2>/dev/null && [ $i -lt 20 ]; do
		sleep 0.5
		i=$((i + 1))
	done
	kill -KILL $agent 2>/dev/null
	kill $witness
	wait $witness $agent 2>/dev/null
	sed "s/^/AKSVM witness $source /" /tmp/witness.$source
	sed "s/^/AKSVM agent $source /" /tmp/agent.$source.out
	sed "s/^/AKSVM log $source /" $log /tmp/witness.$source.err
	say done "$source"
}

# The first source runs on a kernel whose nf_conntrack is loaded after the agent starts.
links
late=1
run_no=0
for source in $(cat /sources); do
	check $source
	late=0
	run_no=$((run_no + 1))
done
say step "$(now)s loading every kernel program"
/bin/programs-load --ignored --nocapture --test-threads=1 2>&1 | sed "s/^/AKSVM programs /"
say finished
poweroff -f
