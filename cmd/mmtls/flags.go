package main

import (
	"fmt"
	"reflect"
	"time"

	"github.com/spf13/pflag"
)

// optionFlags binds the fields of an options struct that carry a `flag`
// tag (and a `help` tag) to command-line flags, so that the struct is the
// one place a setting is declared: its toml tag names the config key, its
// flag tag the flag, and the package that owns it the default.
type optionFlags struct {
	v     reflect.Value // the struct the flags write into
	flags []boundFlag
}

type boundFlag struct {
	f     *pflag.Flag
	index []int
}

// bindOptions declares a flag for every tagged field of *ptr, on persistent
// when the field is tagged `flagset:"persistent"` and on fs otherwise, with
// the matching field of defaults as its default (and *ptr set to it).
// Supported field types: string, bool, int, time.Duration, []string
// (repeatable) and *bool (nil in defaults reads as false).
func bindOptions(fs, persistent *pflag.FlagSet, ptr, defaults any) *optionFlags {
	v := reflect.ValueOf(ptr).Elem()
	d := reflect.ValueOf(defaults)
	b := &optionFlags{v: v}
	t := v.Type()
	for i := range t.NumField() {
		sf := t.Field(i)
		name := sf.Tag.Get("flag")
		if name == "" {
			continue
		}
		set := fs
		if sf.Tag.Get("flagset") == "persistent" {
			set = persistent
		}
		help := sf.Tag.Get("help")
		field, def := v.Field(i), d.Field(i)
		switch p := field.Addr().Interface().(type) {
		case *string:
			set.StringVar(p, name, def.String(), help)
		case *bool:
			set.BoolVar(p, name, def.Bool(), help)
		case *int:
			set.IntVar(p, name, int(def.Int()), help)
		case *time.Duration:
			set.DurationVar(p, name, time.Duration(def.Int()), help)
		case *[]string:
			set.StringArrayVar(p, name, def.Interface().([]string), help)
		case **bool:
			on := !def.IsNil() && def.Elem().Bool()
			*p = &on
			set.BoolVar(*p, name, on, help)
		default:
			panic(fmt.Sprintf("bindOptions: field %s has unsupported type %s", sf.Name, sf.Type))
		}
		b.flags = append(b.flags, boundFlag{f: set.Lookup(name), index: sf.Index})
	}
	return b
}

// over lays the flags the user set over base, a pointer to a struct of the
// bound type, and reports the names of those flags.
func (b *optionFlags) over(base any) map[string]bool {
	dst := reflect.ValueOf(base).Elem()
	changed := map[string]bool{}
	for _, bf := range b.flags {
		if !bf.f.Changed {
			continue
		}
		changed[bf.f.Name] = true
		src := b.v.FieldByIndex(bf.index)
		if src.Kind() == reflect.Pointer { // a *bool: copy the value, not the flag's own variable
			v := reflect.New(src.Type().Elem())
			v.Elem().Set(src.Elem())
			src = v
		}
		dst.FieldByIndex(bf.index).Set(src)
	}
	return changed
}

// values returns a copy of the bound struct: every flag's value, defaults
// included (a command run without a config file).
func (b *optionFlags) values(out any) {
	dst := reflect.ValueOf(out).Elem()
	dst.Set(b.v)
	for _, bf := range b.flags {
		if f := dst.FieldByIndex(bf.index); f.Kind() == reflect.Pointer && !f.IsNil() {
			v := reflect.New(f.Type().Elem())
			v.Elem().Set(f.Elem())
			f.Set(v)
		}
	}
}
