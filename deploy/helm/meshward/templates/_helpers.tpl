{{/* Chart name, truncated to the 63 characters of a DNS label. */}}
{{- define "meshward.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Release-qualified name; the suffixes below (-ca, -agent, -inject) keep names unique. */}}
{{- define "meshward.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 50 | trimSuffix "-" }}
{{- else if contains (include "meshward.name" .) .Release.Name }}
{{- .Release.Name | trunc 50 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name (include "meshward.name" .) | trunc 50 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "meshward.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every object. */}}
{{- define "meshward.labels" -}}
helm.sh/chart: {{ include "meshward.chart" . }}
{{ include "meshward.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: meshward
{{- end }}

{{- define "meshward.selectorLabels" -}}
app.kubernetes.io/name: {{ include "meshward.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "meshward.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "meshward.ca.name" -}}
{{- printf "%s-ca" (include "meshward.fullname" .) }}
{{- end }}

{{- define "meshward.agent.name" -}}
{{- printf "%s-agent" (include "meshward.fullname" .) }}
{{- end }}

{{- define "meshward.webhook.name" -}}
{{- printf "%s-inject" (include "meshward.fullname" .) }}
{{- end }}

{{/* The CA's address for the agents; its serving certificate must name this host. */}}
{{- define "meshward.ca.address" -}}
{{- printf "%s.%s.svc:%v" (include "meshward.ca.name" .) .Release.Namespace .Values.ca.grpcPort }}
{{- end }}

{{/* Namespaces that get the policy ConfigMap: the release's and the listed ones, once each. */}}
{{- define "meshward.policyNamespaces" -}}
{{- prepend .Values.policies.namespaces .Release.Namespace | uniq | toJson }}
{{- end }}
