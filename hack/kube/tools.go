//go:build tools

// Package tools pins the Kubernetes release whose binaries the tests run: the control plane
// (kube-apiserver, kubectl) for every test, and a real node (kubelet, kube-scheduler,
// kube-controller-manager, kube-proxy) for the deployment tests.
package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-proxy"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kubectl"
	_ "k8s.io/kubernetes/cmd/kubelet"
)
