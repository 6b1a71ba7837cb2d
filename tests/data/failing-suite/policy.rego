package demo

double(x) := x * 2
