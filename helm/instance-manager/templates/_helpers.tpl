{{/* Names, labels and the pieces of config.toml shared by the templates. */}}

{{- define "im.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The release's full name: RELEASE-CHART unless the release name already holds it. */}}
{{- define "im.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "im.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "im.selectorLabels" -}}
app.kubernetes.io/name: {{ include "im.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "im.labels" -}}
helm.sh/chart: {{ include "im.chart" . }}
{{ include "im.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: control-plane
app.kubernetes.io/part-of: bbws
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "im.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "im.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The Secret holding the page token key. */}}
{{- define "im.pageTokenSecretName" -}}
{{- default (printf "%s-page-token" (include "im.fullname" .)) .Values.pageTokenSecret.existingSecret }}
{{- end }}

{{/* Where the configuration and the TLS files are mounted. */}}
{{- define "im.configDir" -}}/etc/instance-manager{{- end }}
{{- define "im.tlsDir" -}}/etc/instance-manager/tls{{- end }}

{{/*
A value as TOML: strings quoted (JSON's escapes are TOML's), numbers, booleans, arrays
and inline tables.
*/}}
{{- define "im.toml" -}}
{{- if kindIs "map" . -}}
{ {{- range $i, $k := keys . | sortAlpha }}{{ if $i }},{{ end }} {{ $k }} = {{ include "im.toml" (get $ $k) }}{{ end }} }
{{- else if kindIs "slice" . -}}
[{{ range $i, $v := . }}{{ if $i }}, {{ end }}{{ include "im.toml" $v }}{{ end }}]
{{- else if kindIs "bool" . -}}
{{ . }}
{{- else -}}
{{ toJson . }}
{{- end -}}
{{- end }}

{{/* `key = value` lines of a map's entries with a value, sorted, leaving out `skip`. */}}
{{- define "im.tomlKeys" -}}
{{- $map := index . 0 }}
{{- $skip := index . 1 }}
{{- range $k := keys $map | sortAlpha }}
{{- $v := get $map $k }}
{{- if and (not (has $k $skip)) (not (kindIs "invalid" $v)) }}
{{ $k }} = {{ include "im.toml" $v }}
{{- end }}
{{- end }}
{{- end }}
