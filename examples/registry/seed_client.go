// The seed's chapter 4 with Go's own etcd client (go.etcd.io/etcd/clientv3 and its
// concurrency package, etcd 3.4 — Debian's golang-etcd-server-dev sources), run against a
// Tandem registry: the seed's config Get + Watch, a service registered under a lease kept
// alive, a lock and an election. Every step is checked; the exit code says whether all held.
//
//	go build -o seed_client seed_client.go   (GO111MODULE=off GOPATH=/usr/share/gocode)
//	seed_client 127.0.0.1:2379,127.0.0.1:22379,127.0.0.1:32379
package main

import (
	"context"
	"fmt"
	"log"
	"os"
	"strings"
	"time"

	"go.etcd.io/etcd/clientv3"
	"go.etcd.io/etcd/clientv3/concurrency"
)

var failed = 0

func expect(what string, ok bool, got interface{}) {
	if ok {
		fmt.Printf("ok   %s\n", what)
	} else {
		failed++
		fmt.Printf("FAIL %s (got %v)\n", what, got)
	}
}

// within fails the run if `ch` gives nothing in 20 s (a guard against hanging, not a timing check).
func within(what string, ch <-chan string) string {
	select {
	case v := <-ch:
		return v
	case <-time.After(20 * time.Second):
		log.Fatalf("FAIL %s: nothing after 20 s", what)
		return ""
	}
}

// queued waits until `n` keys exist under `prefix` (a contender has queued behind the holder).
func queued(cli *clientv3.Client, prefix string, n int) {
	for i := 0; i < 10000; i++ {
		r, err := cli.Get(context.TODO(), prefix, clientv3.WithPrefix(), clientv3.WithCountOnly())
		if err == nil && r.Count == int64(n) {
			return
		}
	}
	log.Fatalf("FAIL %d keys under %s never appeared", n, prefix)
}

func main() {
	if len(os.Args) != 2 {
		log.Fatal("usage: seed_client ENDPOINT[,ENDPOINT…]")
	}
	ctx := context.Background()

	// 4.2, as the seed writes it: a client, the config read, then watched.
	cli, err := clientv3.New(clientv3.Config{
		Endpoints:   strings.Split(os.Args[1], ","),
		DialTimeout: 5 * time.Second,
	})
	if err != nil {
		log.Fatal(err)
	}
	defer cli.Close()
	if _, err := cli.Put(ctx, "app_config", `{"max_conns": 100}`); err != nil {
		log.Fatal(err)
	}
	resp, err := cli.Get(context.TODO(), "app_config")
	if err == nil && len(resp.Kvs) > 0 {
		fmt.Printf("Config: %s\n", resp.Kvs[0].Value)
	}
	expect("Get reads the config", err == nil && len(resp.Kvs) == 1, err)
	// From the revision after the read, so no change is missed however the watch races the writes.
	watchCh := cli.Watch(context.Background(), "app_config", clientv3.WithRev(resp.Header.Revision+1))
	go func() {
		cli.Put(ctx, "app_config", `{"max_conns": 200}`)
		cli.Put(ctx, "app_config", `{"max_conns": 300}`)
		cli.Delete(ctx, "app_config")
	}()
	var seen []string
	for wresp := range watchCh {
		for _, ev := range wresp.Events {
			fmt.Printf("更新类型: %s, 值: %s\n", ev.Type, ev.Kv.Value)
			seen = append(seen, fmt.Sprintf("%s %s", ev.Type, ev.Kv.Value))
		}
		if len(seen) >= 3 {
			break
		}
	}
	got := strings.Join(seen, "|")
	expect("Watch delivers every change in order", got == `PUT {"max_conns": 200}|PUT {"max_conns": 300}|DELETE `, got)

	// 4.3: an instance registered under a lease that a keep-alive renews, gone with the lease.
	lease, err := cli.Grant(ctx, 5)
	if err != nil {
		log.Fatal(err)
	}
	key := "/services/user-service/instance-1"
	_, err = cli.Put(ctx, key, `{"addr": "127.0.0.1:8080"}`, clientv3.WithLease(lease.ID))
	expect("Put with a lease", err == nil, err)
	ka, err := cli.KeepAlive(ctx, lease.ID)
	if err != nil {
		log.Fatal(err)
	}
	first := <-ka
	expect("KeepAlive answers with the lease's TTL", first != nil && first.TTL > 0 && first.TTL <= 5, first)
	list, err := cli.Get(ctx, "/services/user-service/", clientv3.WithPrefix())
	expect("the instance is listed", err == nil && len(list.Kvs) == 1, list)
	ttl, err := cli.TimeToLive(ctx, lease.ID, clientv3.WithAttachedKeys())
	expect("TimeToLive names the registration key", err == nil && len(ttl.Keys) == 1 && string(ttl.Keys[0]) == key, ttl)
	_, err = cli.Revoke(ctx, lease.ID)
	expect("Revoke", err == nil, err)
	list, err = cli.Get(ctx, "/services/user-service/", clientv3.WithPrefix())
	expect("revoking the lease deregisters the instance", err == nil && len(list.Kvs) == 0, list)

	// 4.4: a lock between two sessions.
	s1, err := concurrency.NewSession(cli, concurrency.WithTTL(5))
	if err != nil {
		log.Fatal(err)
	}
	s2, err := concurrency.NewSession(cli, concurrency.WithTTL(5))
	if err != nil {
		log.Fatal(err)
	}
	m1 := concurrency.NewMutex(s1, "/seed-lock")
	m2 := concurrency.NewMutex(s2, "/seed-lock")
	if err := m1.Lock(ctx); err != nil {
		log.Fatal(err)
	}
	acquired := make(chan string, 1)
	go func() {
		if err := m2.Lock(ctx); err != nil {
			acquired <- "error: " + err.Error()
			return
		}
		r, _ := cli.Get(ctx, "/seed-lock-owner")
		if len(r.Kvs) == 1 {
			acquired <- string(r.Kvs[0].Value)
		} else {
			acquired <- "nothing"
		}
	}()
	queued(cli, "/seed-lock/", 2)
	select {
	case v := <-acquired:
		expect("the second session waits while the first holds the lock", false, v)
	default:
		expect("the second session waits while the first holds the lock", true, nil)
	}
	cli.Put(ctx, "/seed-lock-owner", "written by the first holder")
	if err := m1.Unlock(ctx); err != nil {
		log.Fatal(err)
	}
	owner := within("the second session's lock", acquired)
	expect("it gets the lock once the first unlocks, and sees what the first wrote", owner == "written by the first holder", owner)
	m2.Unlock(ctx)

	// 4.4: an election, observed, with the leader resigning.
	e1 := concurrency.NewElection(s1, "/seed-election")
	e2 := concurrency.NewElection(s2, "/seed-election")
	if err := e1.Campaign(ctx, "node-a"); err != nil {
		log.Fatal(err)
	}
	leader, err := e1.Leader(ctx)
	expect("node-a leads", err == nil && string(leader.Kvs[0].Value) == "node-a", leader)
	observed := make(chan string, 4)
	go func() {
		for r := range e2.Observe(ctx) {
			observed <- string(r.Kvs[0].Value)
		}
	}()
	won := make(chan string, 1)
	go func() {
		if err := e2.Campaign(ctx, "node-b"); err != nil {
			won <- "error: " + err.Error()
			return
		}
		won <- "node-b"
	}()
	o := within("the first observation", observed)
	expect("an observer sees node-a", o == "node-a", o)
	queued(cli, "/seed-election/", 2)
	if err := e1.Resign(ctx); err != nil {
		log.Fatal(err)
	}
	w := within("node-b's campaign", won)
	expect("node-b wins once node-a resigns", w == "node-b", w)
	o = within("the second observation", observed)
	expect("the observer sees node-b", o == "node-b", o)
	e2.Resign(ctx)
	s1.Close()
	s2.Close()

	if failed > 0 {
		fmt.Printf("%d check(s) failed\n", failed)
		os.Exit(1)
	}
}
