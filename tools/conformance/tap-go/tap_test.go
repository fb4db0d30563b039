package tap

import (
	"bytes"
	"testing"
)

func TestOutput(t *testing.T) {
	var b bytes.Buffer
	tp := New()
	tp.Writer = &b
	tp.Header(0)
	tp.Ok(true, "first")
	tp.Fail("second")
	tp.Todo().Fail("not yet")
	tp.Skip(2, "no reason")
	tp.Diagnostic("two\nlines\n")
	tp.Diagnosticf("n=%d", 7)
	if err := tp.YAML(map[string]int{"a": 1}); err != nil {
		t.Fatal(err)
	}
	tp.AutoPlan()
	want := "TAP version 13\n" +
		"ok 1 - first\n" +
		"not ok 2 - second\n" +
		"not ok 3 # TODO not yet\n" +
		"ok 4 # SKIP no reason\n" +
		"ok 5 # SKIP no reason\n" +
		"# two\n# lines\n" +
		"# n=7\n" +
		"  ---\n  {\n    \"a\": 1\n  }\n  ...\n" +
		"1..5\n"
	if got := b.String(); got != want {
		t.Fatalf("got:\n%s\nwant:\n%s", got, want)
	}
	if tp.Count() != 5 {
		t.Fatalf("Count() = %d", tp.Count())
	}
}
