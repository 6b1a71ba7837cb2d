{{/* Coral's namespace. */}}
{{- define "coral.namespace" -}}
{{ .Values.namespace.name }}
{{- end }}

{{/* Coral's image. */}}
{{- define "coral.image" -}}
image: {{ printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- with .Values.image.pullPolicy }}
imagePullPolicy: {{ . }}
{{- end }}
{{- end }}

{{/* The labels Helm's tooling looks for, on every object (not in selectors). */}}
{{- define "coral.helmLabels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}

{{/* The labels of a component's objects and pods: NAME is coral-controller, coral-webhook… */}}
{{- define "coral.componentLabels" -}}
app.kubernetes.io/name: {{ . }}
app.kubernetes.io/part-of: coral
{{- end }}

{{/* Pod settings every component shares: pull secrets, node selector, tolerations. */}}
{{- define "coral.podScheduling" -}}
{{- with .root.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .component.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .component.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* The runtime's CRI socket on the node. */}}
{{- define "coral.criSocket" -}}
{{- if .Values.runtime.socket }}
{{- .Values.runtime.socket }}
{{- else if eq .Values.runtime.type "crio" }}
{{- "/var/run/crio/crio.sock" }}
{{- else }}
{{- "/run/containerd/containerd.sock" }}
{{- end }}
{{- end }}

{{/* With cert-manager: the annotation that has it inject the webhook's CA. */}}
{{- define "coral.caInjection" -}}
{{- if eq .Values.certificates.mode "cert-manager" }}
annotations:
  cert-manager.io/inject-ca-from: {{ include "coral.namespace" . }}/coral-webhook
{{- end }}
{{- end }}
