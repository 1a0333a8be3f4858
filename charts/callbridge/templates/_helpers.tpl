{{/*
Expand the name of the chart.
*/}}
{{- define "callbridge.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
A fully qualified app name, truncated at 63 characters (DNS label limit).
If the release name already contains the chart name it is used as is.
*/}}
{{- define "callbridge.fullname" -}}
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

{{/*
Chart name and version as used by the chart label.
*/}}
{{- define "callbridge.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Common labels.
*/}}
{{- define "callbridge.labels" -}}
helm.sh/chart: {{ include "callbridge.chart" . }}
{{ include "callbridge.selectorLabels" . }}
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/*
Selector labels.
*/}}
{{- define "callbridge.selectorLabels" -}}
app.kubernetes.io/name: {{ include "callbridge.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
The name of the service account to use.
*/}}
{{- define "callbridge.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "callbridge.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The Secret the pods read their environment from: the chart's own, or an existing one.
*/}}
{{- define "callbridge.secretName" -}}
{{- default (include "callbridge.fullname" .) .Values.secrets.existingSecret }}
{{- end }}

{{/*
Environment variable that carries one webhook secret, from its name in
.Values.secrets.webhookSecrets: "acme-prod" -> CALLBRIDGE_WEBHOOK_SECRET_ACME_PROD.
*/}}
{{- define "callbridge.webhookSecretEnv" -}}
{{- if not (regexMatch "^[A-Za-z0-9][A-Za-z0-9_.-]*$" .) }}
{{- fail (printf "secrets.webhookSecrets: %q is not a valid name (letters, digits, _ . -, starting with a letter or digit)" .) }}
{{- end }}
{{- printf "CALLBRIDGE_WEBHOOK_SECRET_%s" (. | upper | replace "-" "_" | replace "." "_") }}
{{- end }}

{{/*
The container port: the one callbridge listens on (config.server.port).
*/}}
{{- define "callbridge.port" -}}
{{- dig "server" "port" 8080 .Values.config | int }}
{{- end }}

{{/*
Checks that need more than one value. Rendered (empty) by the ConfigMap, so a bad
combination stops the install with one clear message instead of a crash-looping pod.
*/}}
{{- define "callbridge.validate" -}}
{{- $config := .Values.config | default dict }}
{{- if not (dig "upstream" "base_url" "" $config) }}
{{- fail "config.upstream.base_url is required: the call platform's API root, e.g. --set config.upstream.base_url=https://api.example.com" }}
{{- end }}
{{- if and (not .Values.secrets.existingSecret) (not .Values.secrets.apiKey) }}
{{- fail "secrets.apiKey is required (it becomes CALLBRIDGE_API_KEY in the chart's Secret), or set secrets.existingSecret to a Secret that has a CALLBRIDGE_API_KEY key" }}
{{- end }}
{{- if .Values.redis.embedded }}
{{- if gt (int .Values.replicaCount) 1 }}
{{- fail "redis.embedded runs a private Redis inside each pod and only works with replicaCount: 1; set redis.url to an external Redis to run more replicas" }}
{{- end }}
{{- if .Values.redis.url }}
{{- fail "set either redis.url (external Redis) or redis.embedded (single-replica dev mode), not both" }}
{{- end }}
{{- else }}
{{- $fromEnv := false }}
{{- range .Values.extraEnv }}
{{- if eq .name "CALLBRIDGE_REDIS_URL" }}{{ $fromEnv = true }}{{ end }}
{{- end }}
{{- $configUrl := toString (dig "redis" "url" "" $config) }}
{{- $needsEnv := or (not $configUrl) (contains "CALLBRIDGE_REDIS_URL" $configUrl) }}
{{- if and .Values.redis.sentinel.hosts .Values.redis.url }}
{{- fail "set either redis.url or redis.sentinel.hosts (the chart builds the URL from them), not both" }}
{{- end }}
{{- if and .Values.redis.sentinel.hosts .Values.redis.cluster }}
{{- fail "redis.sentinel.hosts and redis.cluster: a Redis behind Sentinel is not a Cluster; choose one" }}
{{- end }}
{{- if and (or .Values.redis.tls.certFile .Values.redis.tls.keyFile) (not (and .Values.redis.tls.certFile .Values.redis.tls.keyFile)) }}
{{- fail "redis.tls.certFile and redis.tls.keyFile go together (mutual TLS)" }}
{{- end }}
{{- if and .Values.redis.tls.certFile (not .Values.redis.tls.existingSecret) }}
{{- fail "redis.tls.certFile needs redis.tls.existingSecret: the Secret the files are mounted from" }}
{{- end }}
{{- if and $needsEnv (not .Values.redis.sentinel.hosts) (not .Values.redis.url) (not .Values.secrets.existingSecret) (not $fromEnv) }}
{{- fail "redis.url is required: callbridge keeps its state in an external Redis, e.g. --set redis.url=redis://:password@redis-master:6379/0 (stored in the chart's Secret as CALLBRIDGE_REDIS_URL). Alternatives: a CALLBRIDGE_REDIS_URL key in secrets.existingSecret, a CALLBRIDGE_REDIS_URL entry in extraEnv, or redis.embedded=true for a single-replica dev install" }}
{{- end }}
{{- end }}
{{- $seen := dict }}
{{- range $name, $_ := .Values.secrets.webhookSecrets }}
{{- $env := include "callbridge.webhookSecretEnv" $name }}
{{- if hasKey $seen $env }}
{{- fail (printf "secrets.webhookSecrets: %q and %q both map to %s" (get $seen $env) $name $env) }}
{{- end }}
{{- $_ := set $seen $env $name }}
{{- end }}
{{- end }}

{{/*
The callbridge config.yaml: .Values.config with the redis section completed from
.Values.redis (cluster flag; embedded dev mode clears the URL and points the data dir
at the pod's emptyDir).
*/}}
{{- define "callbridge.config" -}}
{{- $config := deepCopy (.Values.config | default dict) }}
{{- $redis := deepCopy (get $config "redis" | default dict) }}
{{- $_ := set $redis "cluster" (.Values.redis.cluster | default false) }}
{{- with .Values.redis.sentinel }}
{{- if .hosts }}
{{- $scheme := ternary "rediss+sentinel" "redis+sentinel" $.Values.redis.tls.enabled }}
{{- $_ := set $redis "url" (printf "%s://%s/%s/%d" $scheme (join "," .hosts) .serviceName (int .db)) }}
{{- end }}
{{- if .existingSecret }}
{{- $_ := set $redis "sentinel_password" "${CALLBRIDGE_REDIS_SENTINEL_PASSWORD}" }}
{{- end }}
{{- end }}
{{- if .Values.redis.existingSecret }}
{{- $_ := set $redis "password" "${CALLBRIDGE_REDIS_PASSWORD}" }}
{{- end }}
{{- with .Values.redis.username }}
{{- $_ := set $redis "username" . }}
{{- end }}
{{- with .Values.redis.tls }}
{{- $tls := dict "verify" .verify }}
{{- if .existingSecret }}
{{- $_ := set $tls "ca_file" (printf "%s/%s" (include "callbridge.redisTlsDir" $) .caFile) }}
{{- if .certFile }}
{{- $_ := set $tls "cert_file" (printf "%s/%s" (include "callbridge.redisTlsDir" $) .certFile) }}
{{- $_ := set $tls "key_file" (printf "%s/%s" (include "callbridge.redisTlsDir" $) .keyFile) }}
{{- end }}
{{- end }}
{{- $_ := set $redis "tls" $tls }}
{{- end }}
{{- if .Values.redis.embedded }}
{{- $_ := set $redis "url" "" }}
{{- $_ := set $redis "data_dir" "/var/lib/callbridge/redis" }}
{{- end }}
{{- $_ := set $config "redis" $redis }}
{{- toYaml $config }}
{{- end }}

{{/*
The label matchers that scope the alert expressions to this release's metrics.
*/}}
{{- define "callbridge.metricSelector" -}}
{{- if .Values.prometheusRule.metricSelector }}
{{- .Values.prometheusRule.metricSelector }}
{{- else }}
{{- printf "namespace=%q, job=%q" .Release.Namespace (include "callbridge.fullname" .) }}
{{- end }}
{{- end }}

{{/*
Where the Redis TLS Secret's files are mounted.
*/}}
{{- define "callbridge.redisTlsDir" -}}
/etc/callbridge-redis-tls
{{- end }}
