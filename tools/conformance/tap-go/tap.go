// Package tap writes Test Anything Protocol (TAP version 13) output.
//
// It offers the API of github.com/mndrix/tap-go, which the OCI
// runtime-tools validation suite imports and Debian does not package:
// New, and on *T: Header, Ok, Pass, Fail, Skip, Todo, Count, AutoPlan,
// Diagnostic, Diagnosticf, YAML and Check, plus the exported fields TODO
// and Writer. Written for husk's conformance run (scripts/conformance.sh),
// which builds the suite in GOPATH mode against Debian's Go packages.
package tap

import (
	"encoding/json"
	"fmt"
	"io"
	"os"
	"strings"
	"testing/quick"
)

// T holds the state of one TAP stream. Copies made by Todo share the test
// counter with the original, so numbering stays consecutive.
type T struct {
	next *int

	// TODO marks the test points this T writes with the TODO directive.
	TODO bool

	// Writer receives the output; nil means os.Stdout.
	Writer io.Writer
}

// New returns a T whose first test point is number 1.
func New() *T {
	n := 1
	return &T{next: &n}
}

func (t *T) out() io.Writer {
	if t.Writer == nil {
		return os.Stdout
	}
	return t.Writer
}

func (t *T) printf(format string, a ...interface{}) {
	fmt.Fprintf(t.out(), format, a...)
}

// Header writes the version line and, when testCount is positive, the plan.
// With testCount 0 the plan is left to AutoPlan.
func (t *T) Header(testCount int) {
	t.printf("TAP version 13\n")
	if testCount > 0 {
		t.printf("1..%d\n", testCount)
	}
}

// Ok writes one test point: "ok" when test holds, "not ok" otherwise.
func (t *T) Ok(test bool, description string) {
	status := "ok"
	if !test {
		status = "not ok"
	}
	if t.TODO {
		t.printf("%s %d # TODO %s\n", status, *t.next, description)
	} else {
		t.printf("%s %d - %s\n", status, *t.next, description)
	}
	*t.next++
}

// Pass writes a passing test point.
func (t *T) Pass(description string) { t.Ok(true, description) }

// Fail writes a failing test point.
func (t *T) Fail(description string) { t.Ok(false, description) }

// Check runs testing/quick.Check on function and writes the outcome as one
// test point, with the counterexample as a diagnostic when it fails.
func (t *T) Check(function interface{}, description string) {
	if err := quick.Check(function, nil); err != nil {
		t.Diagnostic(err.Error())
		t.Ok(false, description)
		return
	}
	t.Ok(true, description)
}

// Count is the number of test points written so far.
func (t *T) Count() int { return *t.next - 1 }

// AutoPlan writes the plan for the test points written so far.
func (t *T) AutoPlan() { t.printf("1..%d\n", t.Count()) }

// comment turns a possibly multi-line message into TAP comment lines.
func comment(message string) string {
	return strings.ReplaceAll(strings.TrimRight(message, "\n"), "\n", "\n# ")
}

// Diagnostic writes message as comment lines.
func (t *T) Diagnostic(message string) { t.printf("# %s\n", comment(message)) }

// Diagnosticf writes a formatted message as comment lines.
func (t *T) Diagnosticf(format string, a ...interface{}) {
	t.Diagnostic(fmt.Sprintf(format, a...))
}

// Skip writes count skipped test points.
func (t *T) Skip(count int, description string) {
	for i := 0; i < count; i++ {
		t.printf("ok %d # SKIP %s\n", *t.next, description)
		*t.next++
	}
}

// Todo returns a T that writes TODO test points into the same stream.
func (t *T) Todo() *T {
	c := *t
	c.TODO = true
	return &c
}

// YAML writes message as a TAP 13 YAML block attached to the previous test
// point. Like tap-go built without its "yaml" tag, it writes JSON, which
// is valid YAML.
func (t *T) YAML(message interface{}) error {
	doc, err := json.MarshalIndent(message, "  ", "  ")
	if err != nil {
		return err
	}
	t.printf("  ---\n  %s\n  ...\n", doc)
	return nil
}
