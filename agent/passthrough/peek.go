package passthrough

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
)

// maxHello bounds the ClientHello read: post-quantum key shares make real
// hellos span several TCP segments, but never this much.
const maxHello = 64 << 10

var errNotTLS = errors.New("not a TLS handshake")

// errMalformedHello is made once: serverName runs for every connection.
var errMalformedHello = fmt.Errorf("%w: malformed ClientHello", errNotTLS)

// peekClientHello reads from c until it holds a whole ClientHello, across
// TCP segments and TLS records, and returns the bytes read (to be replayed
// to the upstream, unchanged) and the server name, "" when none was sent.
func peekClientHello(c net.Conn) ([]byte, string, error) {
	buf := make([]byte, 0, 2048)
	for {
		done, sni, err := helloIn(buf)
		if err != nil {
			return nil, "", err
		}
		if done {
			return buf, sni, nil
		}
		if cap(buf)-len(buf) < 1024 {
			nb := make([]byte, len(buf), 2*cap(buf))
			copy(nb, buf)
			buf = nb
		}
		n, err := c.Read(buf[len(buf):cap(buf)])
		buf = buf[:len(buf)+n]
		if err != nil {
			if err == io.EOF && len(buf) == 0 {
				return nil, "", err
			}
			if n == 0 {
				return nil, "", err
			}
		}
	}
}

// helloIn reports whether buf, the first bytes of a connection, holds a
// whole ClientHello (across TLS records), and its server name; an error
// when it cannot be the start of one, or none ends within maxHello.
func helloIn(buf []byte) (done bool, sni string, err error) {
	var hs []byte // the handshake message so far, records unwrapped
	off := 0      // start of the next record in buf
	for len(buf)-off >= 5 {
		if buf[off] != 0x16 {
			return false, "", errNotTLS
		}
		n := int(binary.BigEndian.Uint16(buf[off+3 : off+5]))
		if buf[off+1] != 3 || n == 0 || n > 1<<14+2048 {
			return false, "", errNotTLS
		}
		if len(buf)-off < 5+n {
			break
		}
		if rec := buf[off+5 : off+5+n]; hs == nil {
			hs = rec // one record holds it, as a rule: no copy
		} else {
			// Across records: a copy of its own (the full slice
			// expression keeps append from writing into buf).
			hs = append(hs[:len(hs):len(hs)], rec...)
		}
		off += 5 + n
		if len(hs) >= 4 {
			if hs[0] != 1 {
				return false, "", fmt.Errorf("%w: first handshake message is type %d", errNotTLS, hs[0])
			}
			mlen := int(hs[1])<<16 | int(hs[2])<<8 | int(hs[3])
			if mlen > maxHello {
				return false, "", fmt.Errorf("%w: ClientHello of %d bytes", errNotTLS, mlen)
			}
			if len(hs) >= 4+mlen {
				sni, err := serverName(hs[4 : 4+mlen])
				return err == nil, sni, err
			}
		}
	}
	if len(buf) >= maxHello {
		return false, "", fmt.Errorf("%w: no complete ClientHello in %d bytes", errNotTLS, len(buf))
	}
	return false, "", nil
}

// serverName parses a ClientHello body and returns its server_name.
func serverName(b []byte) (string, error) {
	// version(2) random(32)
	if len(b) < 34 {
		return "", errMalformedHello
	}
	b = b[34:]
	skip := func(lenBytes int) bool {
		if len(b) < lenBytes {
			return false
		}
		n := 0
		for i := range lenBytes {
			n = n<<8 | int(b[i])
		}
		if len(b) < lenBytes+n {
			return false
		}
		b = b[lenBytes+n:]
		return true
	}
	if !skip(1) || !skip(2) || !skip(1) { // session id, cipher suites, compression
		return "", errMalformedHello
	}
	if len(b) == 0 {
		return "", nil // no extensions
	}
	if len(b) < 2 {
		return "", errMalformedHello
	}
	ext := b[2:]
	if int(binary.BigEndian.Uint16(b)) != len(ext) {
		return "", errMalformedHello
	}
	for len(ext) >= 4 {
		typ, n := binary.BigEndian.Uint16(ext), int(binary.BigEndian.Uint16(ext[2:]))
		if len(ext) < 4+n {
			return "", errMalformedHello
		}
		data := ext[4 : 4+n]
		ext = ext[4+n:]
		if typ != 0 { // server_name
			continue
		}
		if len(data) < 2 {
			return "", errMalformedHello
		}
		list := data[2:]
		for len(list) >= 3 {
			nt, nl := list[0], int(binary.BigEndian.Uint16(list[1:]))
			if len(list) < 3+nl {
				return "", errMalformedHello
			}
			if nt == 0 {
				return string(list[3 : 3+nl]), nil
			}
			list = list[3+nl:]
		}
		return "", nil
	}
	return "", nil
}
