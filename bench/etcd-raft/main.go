// The same workload as TandemBench's Raft lines, on etcd-io/raft (etcd 3.4.23, from Debian's
// golang-etcd-server-dev): a 3-node cluster in memory, every message delivered, every Ready
// appended to MemoryStorage, 128-byte entries. Run with bench/run-etcd-raft.sh.
package main

import (
	"fmt"
	"io/ioutil"
	"log"
	"time"

	"go.etcd.io/etcd/raft"
	pb "go.etcd.io/etcd/raft/raftpb"
)

type node struct {
	rn *raft.RawNode
	st *raft.MemoryStorage
}

func newCluster() []*node {
	peers := []raft.Peer{{ID: 1}, {ID: 2}, {ID: 3}}
	logger := &raft.DefaultLogger{Logger: log.New(ioutil.Discard, "", 0)}
	var ns []*node
	for id := uint64(1); id <= 3; id++ {
		st := raft.NewMemoryStorage()
		c := &raft.Config{ID: id, ElectionTick: 10, HeartbeatTick: 1, Storage: st, MaxSizePerMsg: 1 << 20,
			MaxInflightMsgs: 256, PreVote: true, CheckQuorum: true, Logger: logger}
		rn, err := raft.NewRawNode(c)
		if err != nil {
			panic(err)
		}
		if err := rn.Bootstrap(peers); err != nil {
			panic(err)
		}
		ns = append(ns, &node{rn, st})
	}
	settle(ns)
	if err := ns[0].rn.Campaign(); err != nil {
		panic(err)
	}
	settle(ns)
	return ns
}

func settle(ns []*node) {
	var msgs []pb.Message
	for {
		progressed := false
		for _, n := range ns {
			for n.rn.HasReady() {
				rd := n.rn.Ready()
				if !raft.IsEmptyHardState(rd.HardState) {
					n.st.SetHardState(rd.HardState)
				}
				n.st.Append(rd.Entries)
				msgs = append(msgs, rd.Messages...)
				n.rn.Advance(rd)
				progressed = true
			}
		}
		if len(msgs) == 0 && !progressed {
			return
		}
		batch := msgs
		msgs = nil
		for _, m := range batch {
			ns[m.To-1].rn.Step(m)
		}
	}
}

func measure(name string, ops int, body func()) {
	body() // warm-up
	best := time.Hour
	for i := 0; i < 3; i++ {
		start := time.Now()
		body()
		if d := time.Since(start); d < best {
			best = d
		}
	}
	fmt.Printf("%-58s %10.0f entries/s  (best of 3: %d in %d ms)\n", name, float64(ops)/best.Seconds(), ops, best.Milliseconds())
}

func main() {
	payload := make([]byte, 128)
	measure("etcd-raft: 3-node cluster, 128 B entries, batches of 100", 200000, func() {
		ns := newCluster()
		for b := 0; b < 2000; b++ {
			for i := 0; i < 100; i++ {
				if err := ns[0].rn.Propose(payload); err != nil {
					panic(err)
				}
			}
			settle(ns)
		}
	})
	measure("etcd-raft: 3-node cluster, 128 B entries, one at a time", 20000, func() {
		ns := newCluster()
		for i := 0; i < 20000; i++ {
			if err := ns[0].rn.Propose(payload); err != nil {
				panic(err)
			}
			settle(ns)
		}
	})
}
