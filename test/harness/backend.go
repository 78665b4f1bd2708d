package main

import (
	"crypto/tls"
	"flag"
	"io"
	"net"
	"os"
	"os/signal"
	"syscall"
)

// The backends speak one byte of protocol after connecting (and, for TLS,
// after the handshake): 'E' echo, 'D' send forever, 'U' swallow.

func backendMain(args []string) {
	fs := flag.NewFlagSet("backend", flag.ExitOnError)
	addr := fs.String("listen", "127.0.0.1:0", "")
	certFile := fs.String("cert", "", "")
	keyFile := fs.String("key", "", "")
	fs.Parse(args)
	ln, err := net.Listen("tcp", *addr)
	if err != nil {
		os.Stderr.WriteString(err.Error() + "\n")
		os.Exit(1)
	}
	if *certFile != "" {
		cert, err := tls.LoadX509KeyPair(*certFile, *keyFile)
		if err != nil {
			os.Stderr.WriteString(err.Error() + "\n")
			os.Exit(1)
		}
		ln = tls.NewListener(ln, &tls.Config{Certificates: []tls.Certificate{cert}})
	}
	os.Stdout.WriteString(ln.Addr().String() + "\n")
	go func() {
		ch := make(chan os.Signal, 1)
		signal.Notify(ch, syscall.SIGTERM, os.Interrupt)
		<-ch
		os.Exit(0)
	}()
	for {
		c, err := ln.Accept()
		if err != nil {
			continue
		}
		go serveBackend(c)
	}
}

var zeros = make([]byte, 64<<10)

func serveBackend(c net.Conn) {
	defer c.Close()
	var cmd [1]byte
	if _, err := io.ReadFull(c, cmd[:]); err != nil {
		return
	}
	switch cmd[0] {
	case 'E':
		buf := make([]byte, 4096)
		for {
			n, err := c.Read(buf)
			if n > 0 {
				if _, err := c.Write(buf[:n]); err != nil {
					return
				}
			}
			if err != nil {
				return
			}
		}
	case 'D':
		for {
			if _, err := c.Write(zeros); err != nil {
				return
			}
		}
	case 'U':
		io.Copy(io.Discard, c)
	}
}
