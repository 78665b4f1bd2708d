package main

import (
	"flag"
	"hash/fnv"
	"io"
	"net"
	"os"
	"os/signal"
	"syscall"
	"time"
)

// naiveMain is the reference point the balancer is measured against: the
// simplest Go proxy, io.Copy both ways between two *net.TCPConn (which
// Go turns into splice(2) through a pipe pair per direction), the
// upstream chosen by a hash of the client address. No peek, no health,
// no limits: what the runtime gives for free.
func naiveMain(args []string) {
	fs := flag.NewFlagSet("naive", flag.ExitOnError)
	addr := fs.String("listen", "127.0.0.1:0", "")
	var ups multi
	fs.Var(&ups, "upstream", "")
	fs.Parse(args)
	ln, err := net.Listen("tcp", *addr)
	if err != nil {
		os.Stderr.WriteString(err.Error() + "\n")
		os.Exit(1)
	}
	go func() {
		ch := make(chan os.Signal, 1)
		signal.Notify(ch, syscall.SIGTERM, os.Interrupt)
		<-ch
		os.Exit(0)
	}()
	for {
		c, err := ln.Accept()
		if err != nil {
			time.Sleep(10 * time.Millisecond) // out of descriptors: do not spin
			continue
		}
		go func() {
			defer c.Close()
			h := fnv.New32a()
			h.Write(c.RemoteAddr().(*net.TCPAddr).IP)
			u, err := net.Dial("tcp", ups[int(h.Sum32())%len(ups)])
			if err != nil {
				return
			}
			defer u.Close()
			go func() {
				io.Copy(u, c)
				u.(*net.TCPConn).CloseWrite()
			}()
			io.Copy(c, u)
		}()
	}
}

type multi []string

func (m *multi) String() string     { return "" }
func (m *multi) Set(s string) error { *m = append(*m, s); return nil }
