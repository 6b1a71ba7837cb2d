package demo_test

import data.demo

test_double_passes if demo.double(2) == 4

test_double_fails if demo.double(2) == 5

test_errors if {
	x := to_number("not a number")
	x == 1
}
