{{/* Names */}}
{{- define "llm-proxy.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "llm-proxy.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "llm-proxy.controlPlane.fullname" -}}{{ include "llm-proxy.fullname" . }}-control-plane{{- end -}}
{{- define "llm-proxy.dataPlane.fullname" -}}{{ include "llm-proxy.fullname" . }}-data-plane{{- end -}}
{{- define "llm-proxy.postgresql.fullname" -}}{{ include "llm-proxy.fullname" . }}-postgresql{{- end -}}
{{- define "llm-proxy.redis.fullname" -}}{{ include "llm-proxy.fullname" . }}-redis{{- end -}}

{{- define "llm-proxy.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels: include with (dict "ctx" $ "component" "control-plane") */}}
{{- define "llm-proxy.selectorLabels" -}}
app.kubernetes.io/name: {{ include "llm-proxy.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "llm-proxy.labels" -}}
helm.sh/chart: {{ include "llm-proxy.chart" .ctx }}
{{ include "llm-proxy.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/part-of: llm-proxy
{{- with .ctx.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "llm-proxy.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default "" | toString | default .Chart.AppVersion) -}}
{{- end -}}

{{- define "llm-proxy.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "llm-proxy.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* Secrets: the chart's Secret holds generated values and URLs given in values. */}}
{{- define "llm-proxy.secretName" -}}{{ include "llm-proxy.fullname" . }}{{- end -}}

{{- define "llm-proxy.credentialsSecretName" -}}
{{- default (include "llm-proxy.secretName" .) .Values.secrets.existingSecret -}}
{{- end -}}

{{/* Database URL: "name key" of the Secret holding it. */}}
{{- define "llm-proxy.databaseSecretName" -}}
{{- if and (not .Values.postgresql.enabled) .Values.externalDatabase.existingSecret -}}
{{- .Values.externalDatabase.existingSecret -}}
{{- else -}}
{{- include "llm-proxy.secretName" . -}}
{{- end -}}
{{- end -}}
{{- define "llm-proxy.databaseSecretKey" -}}
{{- if and (not .Values.postgresql.enabled) .Values.externalDatabase.existingSecret -}}
{{- .Values.externalDatabase.existingSecretKey -}}
{{- else -}}
database-url
{{- end -}}
{{- end -}}

{{/* Redis: "true" when the data planes get a REDIS_URL. */}}
{{- define "llm-proxy.redisEnabled" -}}
{{- if or .Values.redis.enabled .Values.externalRedis.url .Values.externalRedis.existingSecret -}}true{{- end -}}
{{- end -}}
{{- define "llm-proxy.redisSecretName" -}}
{{- if and (not .Values.redis.enabled) .Values.externalRedis.existingSecret -}}
{{- .Values.externalRedis.existingSecret -}}
{{- else -}}
{{- include "llm-proxy.secretName" . -}}
{{- end -}}
{{- end -}}
{{- define "llm-proxy.redisSecretKey" -}}
{{- if and (not .Values.redis.enabled) .Values.externalRedis.existingSecret -}}
{{- .Values.externalRedis.existingSecretKey -}}
{{- else -}}
redis-url
{{- end -}}
{{- end -}}

{{/* TLS: where the certificates come from: "helm", "cert-manager" or "existing". */}}
{{- define "llm-proxy.tlsSource" -}}
{{- if .Values.tls.certManager.enabled -}}cert-manager
{{- else if .Values.tls.existing.serverSecret -}}existing
{{- else -}}helm
{{- end -}}
{{- end -}}

{{/* Secret with the control plane's tls.crt, tls.key and ca.crt (the CA data planes trust). */}}
{{- define "llm-proxy.tls.serverSecretName" -}}
{{- if eq (include "llm-proxy.tlsSource" .) "existing" -}}
{{- .Values.tls.existing.serverSecret -}}
{{- else -}}
{{- include "llm-proxy.controlPlane.fullname" . }}-tls
{{- end -}}
{{- end -}}

{{/* Secret with the data planes' client tls.crt, tls.key and ca.crt (the CA the control plane trusts). */}}
{{- define "llm-proxy.tls.clientSecretName" -}}
{{- if eq (include "llm-proxy.tlsSource" .) "existing" -}}
{{- .Values.tls.existing.clientSecret -}}
{{- else -}}
{{- include "llm-proxy.dataPlane.fullname" . }}-tls
{{- end -}}
{{- end -}}

{{/* DNS names of the control plane's server certificate. */}}
{{- define "llm-proxy.tls.serverDnsNames" -}}
{{- $svc := include "llm-proxy.controlPlane.fullname" . -}}
{{- $ns := .Release.Namespace -}}
{{- $names := list $svc (printf "%s.%s" $svc $ns) (printf "%s.%s.svc" $svc $ns) (printf "%s.%s.svc.cluster.local" $svc $ns) -}}
{{- if .Values.tls.localhostSans -}}{{- $names = append $names "localhost" -}}{{- end -}}
{{- $names = concat $names .Values.tls.extraDnsNames -}}
{{- toJson $names -}}
{{- end -}}

{{- define "llm-proxy.controlPlaneUrl" -}}
{{- if .Values.dataPlane.controlPlaneUrl -}}
{{- .Values.dataPlane.controlPlaneUrl -}}
{{- else -}}
{{- printf "%s://%s.%s.svc:%d" (ternary "https" "http" .Values.tls.enabled) (include "llm-proxy.controlPlane.fullname" .) .Release.Namespace (int .Values.controlPlane.ports.grpc) -}}
{{- end -}}
{{- end -}}

{{/* Topology spread over zones and nodes; include with (dict "ctx" $ "component" "...") */}}
{{- define "llm-proxy.topologySpread" -}}
{{- range $key := list "topology.kubernetes.io/zone" "kubernetes.io/hostname" }}
- maxSkew: 1
  topologyKey: {{ $key }}
  whenUnsatisfiable: ScheduleAnyway
  labelSelector:
    matchLabels:
      {{- include "llm-proxy.selectorLabels" $ | nindent 6 }}
  matchLabelKeys:
    - pod-template-hash
{{- end }}
{{- end -}}

{{/* A checksum of the values behind secrets and certificates, so pods roll when they change. */}}
{{- define "llm-proxy.configChecksum" -}}
{{- list .Values.secrets .Values.tls .Values.externalDatabase .Values.externalRedis .Values.postgresql.auth .Values.redis.auth | toJson | sha256sum -}}
{{- end -}}

{{/* Checks of value combinations that the schema cannot express. */}}
{{- define "llm-proxy.validate" -}}
{{- if and .Values.postgresql.enabled (or .Values.externalDatabase.url .Values.externalDatabase.existingSecret) -}}
{{- fail "externalDatabase.* is set while postgresql.enabled=true: set postgresql.enabled=false to use an external database" -}}
{{- end -}}
{{- if and (not .Values.postgresql.enabled) (not .Values.externalDatabase.url) (not .Values.externalDatabase.existingSecret) -}}
{{- fail "no database: set externalDatabase.url (postgres://...) or externalDatabase.existingSecret, or postgresql.enabled=true for the bundled evaluation Postgres" -}}
{{- end -}}
{{- if and .Values.redis.enabled (or .Values.externalRedis.url .Values.externalRedis.existingSecret) -}}
{{- fail "externalRedis.* is set while redis.enabled=true: set redis.enabled=false to use an external Redis" -}}
{{- end -}}
{{- if and .Values.tls.certManager.enabled (or .Values.tls.existing.serverSecret .Values.tls.existing.clientSecret) -}}
{{- fail "tls.certManager.enabled and tls.existing.* are exclusive: pick one source of certificates" -}}
{{- end -}}
{{- if and .Values.tls.existing.clientSecret (not .Values.tls.existing.serverSecret) -}}
{{- fail "tls.existing.clientSecret needs tls.existing.serverSecret" -}}
{{- end -}}
{{- if and .Values.tls.enabled .Values.tls.mtls .Values.tls.existing.serverSecret (not .Values.tls.existing.clientSecret) -}}
{{- fail "tls.mtls with tls.existing.serverSecret needs tls.existing.clientSecret (the data planes' client certificate)" -}}
{{- end -}}
{{- if and (not .Values.tls.enabled) (or .Values.tls.mtls .Values.tls.certManager.enabled .Values.tls.existing.serverSecret) -}}
{{- fail "tls.mtls, tls.certManager.enabled and tls.existing.* need tls.enabled=true" -}}
{{- end -}}
{{- end -}}
